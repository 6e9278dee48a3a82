//! Supervision, retries, degraded mode and deadlines, proven by injecting faults through the
//! admin API into a real server under concurrent load. Behaviour is asserted (every request
//! answered exactly once, recovery), never timings.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "test-token";

fn server(manifest: &str) -> String {
    let dir = model_dir(manifest);
    start(&dir, |config| config.admin_token = Some(TOKEN.into()))
}

fn mlp_manifest(extra: &str) -> String {
    format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        replicas = 2
        max_batch_size = 8
        max_queue_delay_ms = 0
        {extra}

        [[models]]
        name = "mlp_small"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 64
        "#
    )
}

async fn router_status(c: &reqwest::Client, url: &str, model: &str) -> Value {
    let (_, list) = admin_call(c, &format!("{url}/admin/models"), TOKEN, None).await;
    model_row(&list, model)["router"].clone()
}

async fn wait_for_replicas(c: &reqwest::Client, url: &str, model: &str, want: u64) {
    for _ in 0..200 {
        if router_status(c, url, model).await["healthy_replicas"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{model} did not get back to {want} healthy replicas");
}

/// Sends `n` concurrent single-row requests and returns each one's status and body.
async fn burst(
    c: &reqwest::Client,
    url: &str,
    n: u64,
    headers: &[(&str, &str)],
) -> Vec<(u16, Value)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let c = c.clone();
            let url = format!("{url}/v2/models/mlp/infer");
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            tokio::spawn(async move {
                let mut request = c.post(url).json(&mlp_request(&features(i, 1)));
                for (k, v) in headers {
                    request = request.header(k, v);
                }
                let response = request
                    .send()
                    .await
                    .expect("every request gets an HTTP answer");
                (
                    response.status().as_u16(),
                    response.json::<Value>().await.unwrap(),
                )
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashing_workers_are_replaced_and_no_request_is_lost() {
    let url = server(&mlp_manifest(""));
    let c = client();
    // Replica 0 panics on its next three batches (its replacements inherit the queue).
    inject_fault(
        &c,
        &url,
        TOKEN,
        "mlp",
        json!({"fault": {"kind": "panic"}, "replica": 0, "count": 3}),
    )
    .await;
    let answers = burst(&c, &url, 200, &[]).await;
    assert_eq!(answers.len(), 200);
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    for (status, body) in &answers {
        match status {
            200 => assert_eq!(body["outputs"][0]["shape"], json!([1, 16])),
            503 => assert!(body["error"].as_str().unwrap().contains("worker"), "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // Retries on the healthy replica keep almost everything: only a request whose retry also
    // landed on a panicking worker may fail, with an explicit 503.
    assert!(ok >= 150, "only {ok} of 200 succeeded");
    wait_for_replicas(&c, &url, "mlp", 2).await;
    let status = router_status(&c, &url, "mlp").await;
    assert!(status["restarts"].as_u64().unwrap() >= 1, "{status}");
    // The series exists at 0 from the start (and other tests here restart mlp workers too),
    // so what proves the restart is a value of at least one.
    let metrics = metrics_text(&c, &url).await;
    let restarts = sample(
        &metrics,
        "streamserve_worker_restarts_total{model=\"mlp\",version=\"1\"}",
    );
    assert!(restarts.is_some_and(|n| n >= 1.0), "{metrics}");
    // Full capacity again: a second burst with no faults is answered in full.
    assert!(burst(&c, &url, 50, &[])
        .await
        .iter()
        .all(|(s, _)| *s == 200));
}

/// Every replica dies on the same fault, so a retried batch dies again: with a fallback, those
/// requests are answered by it (degraded) instead of 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_that_outlive_their_retry_go_to_the_fallback() {
    let url = server(&mlp_manifest("fallback = \"mlp_small\""));
    let c = client();
    inject_fault(
        &c,
        &url,
        TOKEN,
        "mlp",
        json!({"fault": {"kind": "panic"}, "count": 2}),
    )
    .await;
    let answers = burst(&c, &url, 120, &[]).await;
    let mut degraded = 0;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["outputs"][0]["shape"], json!([1, 16]));
        if body["parameters"]["degraded"] == true {
            assert_eq!(body["parameters"]["served_by"], "mlp_small:1");
            degraded += 1;
        }
    }
    assert!(degraded > 0, "no request went to the fallback");
    let status = router_status(&c, &url, "mlp").await;
    assert!(status["restarts"].as_u64().unwrap() >= 2, "{status}");
    wait_for_replicas(&c, &url, "mlp", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_worker_is_detected_and_its_batch_retried() {
    let url = server(&mlp_manifest("hang_timeout_ms = 300"));
    let c = client();
    inject_fault(
        &c,
        &url,
        TOKEN,
        "mlp",
        json!({"fault": {"kind": "hang", "ms": 3000}, "replica": 0}),
    )
    .await;
    let answers = burst(&c, &url, 60, &[]).await;
    for (status, body) in &answers {
        assert_eq!(
            *status, 200,
            "the hung batch was retried on the other replica: {body}"
        );
    }
    wait_for_replicas(&c, &url, "mlp", 2).await;
    assert!(
        router_status(&c, &url, "mlp").await["restarts"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_goes_to_the_fallback_and_comes_back() {
    let url = server(&mlp_manifest("slo_ms = 20\nfallback = \"mlp_small\""));
    let c = client();
    // Both replicas become slow for a while: the predicted wait passes the SLO.
    inject_fault(
        &c,
        &url,
        TOKEN,
        "mlp",
        json!({"fault": {"kind": "slow", "ms": 150}, "count": 4}),
    )
    .await;
    let answers = burst(&c, &url, 150, &[]).await;
    let mut degraded = 0;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["model_name"], "mlp");
        if body["parameters"]["degraded"] == true {
            assert_eq!(body["parameters"]["served_by"], "mlp_small:1");
            degraded += 1;
        } else {
            assert_eq!(body["parameters"]["served_by"], "mlp:1");
        }
    }
    assert!(degraded > 0, "nothing went to the fallback");
    assert!(degraded < 150, "nothing was served by the primary");
    // Once the queue drains, traffic returns to the primary.
    let mut back = false;
    for _ in 0..100 {
        let (status, body) = post(
            &c,
            &format!("{url}/v2/models/mlp/infer"),
            &mlp_request(&features(7, 1)),
        )
        .await;
        assert_eq!(status, 200);
        if body["parameters"]["degraded"] == false {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "traffic never returned to the primary");
    // Counted by the model the client asked for, with the fallback that took the requests in.
    let metrics = metrics_text(&c, &url).await;
    let degraded_total = sample(
        &metrics,
        "streamserve_degraded_total{model=\"mlp\",version=\"1\",served_by=\"mlp_small\"}",
    );
    assert!(
        degraded_total.is_some_and(|n| n >= degraded as f64),
        "{degraded} degraded answers: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_requests_past_their_deadline_get_504_without_running() {
    let url = server(&mlp_manifest(""));
    let c = client();
    inject_fault(
        &c,
        &url,
        TOKEN,
        "mlp",
        json!({"fault": {"kind": "slow", "ms": 600}, "count": 1}),
    )
    .await;
    inject_fault(
        &c,
        &url,
        TOKEN,
        "mlp",
        json!({"fault": {"kind": "slow", "ms": 600}, "replica": 1, "count": 1}),
    )
    .await;
    // Occupy both replicas, then send requests that may wait at most 100 ms.
    let blockers = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { burst(&c, &url, 2, &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hurried = burst(&c, &url, 5, &[("x-timeout-ms", "100")]).await;
    for (status, body) in &hurried {
        assert_eq!(*status, 504, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("deadline exceeded"),
            "{body}"
        );
    }
    assert!(blockers.await.unwrap().iter().all(|(s, _)| *s == 200));
    // Triton's timeout parameter (microseconds) works the same; a bad header is a 400.
    let mut body = mlp_request(&features(1, 1));
    body["parameters"] = json!({"timeout": 5_000_000});
    assert_eq!(
        post(&c, &format!("{url}/v2/models/mlp/infer"), &body)
            .await
            .0,
        200
    );
    let (status, _) = {
        let response = c
            .post(format!("{url}/v2/models/mlp/infer"))
            .header("x-timeout-ms", "soon")
            .json(&mlp_request(&features(1, 1)))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), ())
    };
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_admin_api_needs_its_token() {
    let c = client();
    let url = server(&mlp_manifest(""));
    let response = c.get(format!("{url}/admin/models")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = c
        .get(format!("{url}/admin/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = c
        .post(format!("{url}/admin/models/mlp/faults"))
        .bearer_auth(TOKEN)
        .body("{\"fault\":{\"kind\":\"melt\"}}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = c
        .post(format!("{url}/admin/models/mlp/faults"))
        .bearer_auth(TOKEN)
        .json(&json!({"fault": {"kind": "panic"}, "replica": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // Without a configured token the admin API does not exist.
    let plain = bundled();
    let response = c
        .get(format!("{plain}/admin/models"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("--admin-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_max_inflight_requests_are_refused_at_once() {
    let dir = model_dir(&mlp_manifest(""));
    let url = start(&dir, |config| {
        config.admin_token = Some(TOKEN.into());
        config.max_inflight = 4;
    });
    let c = client();
    inject_fault(
        &c,
        &url,
        TOKEN,
        "mlp",
        json!({"fault": {"kind": "slow", "ms": 400}, "count": 4}),
    )
    .await;
    let answers = burst(&c, &url, 30, &[]).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let shed: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(ok + shed.len(), 30, "every request is answered, 200 or 429");
    assert!(ok >= 4, "the first requests are admitted");
    assert!(!shed.is_empty(), "requests past max_inflight are refused");
    assert!(shed[0]["error"]
        .as_str()
        .unwrap()
        .contains("admission limit"));
    // Once the admitted ones finish, new requests are admitted again.
    let (status, _) = post(
        &c,
        &format!("{url}/v2/models/mlp/infer"),
        &mlp_request(&features(1, 1)),
    )
    .await;
    assert_eq!(status, 200);
}
