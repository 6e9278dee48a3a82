//! What the README and docs/status-page.md promise an operator, checked over real sockets:
//! a repository unload answers once its version is drained, and the admin listing and the
//! status page say why a version whose last load failed is not loaded.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "operations-test-token";
const TYPED_OPS_SHA: &str = "e491291eeeb4b687cde854db925c3c769498cd67b25c9f54b5eb5b14534916de";

/// One row of `typed_ops`' inputs.
fn typed_ops_request() -> Value {
    json!({"inputs": [
        {"name": "a", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]},
        {"name": "b", "datatype": "FP64", "shape": [1, 4], "data": [0.5, -1.0, 0.0, 2.0]},
        {"name": "mask", "datatype": "BOOL", "shape": [1, 4], "data": [true, false, true, false]}
    ]})
}

/// README: "unload once it is drained". A request running on the version when the unload
/// comes has been answered by the time the unload is; the unload used to answer at once,
/// with the request still running and the router still holding its replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repository_unload_answers_once_its_version_is_drained() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "drained_ops"
        version = "1"
        file = "{{models}}/typed_ops/1/model.onnx"
        sha256 = "{TYPED_OPS_SHA}"
        "#
    ));
    let url = start(&dir, |c| c.admin_token = Some(TOKEN.into()));
    let c = client();
    let fault = json!({"fault": {"kind": "slow", "ms": 1500}});
    inject_fault(&c, &url, TOKEN, "drained_ops", fault).await;
    let running = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move {
            post(
                &c,
                &format!("{url}/v2/models/drained_ops/infer"),
                &typed_ops_request(),
            )
            .await
        }
    });
    // On its replica, 1.5 s from its answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !running.is_finished(),
        "the slowed request is still running"
    );
    let started = Instant::now();
    let (status, answer) = admin_call(
        &c,
        &format!("{url}/v2/repository/models/drained_ops/unload"),
        TOKEN,
        Some(&json!({"parameters": {"unload_dependents": false}})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        running.is_finished(),
        "the unload answered after {:?}, with the request it drains still running",
        started.elapsed()
    );
    let (status, body) = running.await.unwrap();
    assert_eq!(
        status, 200,
        "what was running on the version finished there: {body}"
    );
    let (_, list) = get(&c, &format!("{url}/v2/models")).await;
    assert_eq!(
        model_row(&list, "drained_ops")["state"],
        "UNLOADED",
        "{list}"
    );
    // And its next request loads it again.
    let (status, body) = post(
        &c,
        &format!("{url}/v2/models/drained_ops/infer"),
        &typed_ops_request(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// A version refused for lack of memory stays loadable (UNLOADED) with the reason; the admin
/// listing and `/status` (the page's tooltip) give that reason as `/v2/models` does, rather
/// than a bare UNLOADED that a load or request then refuses with 503.
#[tokio::test]
async fn the_admin_listing_and_status_say_why_a_version_did_not_load() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "small_ops"
        version = "1"
        file = "{{models}}/typed_ops/1/model.onnx"
        sha256 = "{TYPED_OPS_SHA}"

        [[models]]
        name = "big_mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        load = "lazy"
        "#
    ));
    // Room for typed_ops (about 1 MiB), not for mlp (about 11 MiB).
    let url = start(&dir, |c| {
        c.admin_token = Some(TOKEN.into());
        c.memory_budget_mb = Some(4);
    });
    let c = client();
    let (status, answer) = admin_call(
        &c,
        &format!("{url}/admin/models/big_mlp/load"),
        TOKEN,
        Some(&json!({})),
    )
    .await;
    assert_eq!(status, 503, "{answer}");
    let (_, listed) = get(&c, &format!("{url}/v2/models")).await;
    let row = model_row(&listed, "big_mlp");
    assert_eq!(row["state"], "UNLOADED", "{listed}");
    let reason = row["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("does not fit"), "{listed}");
    for path in ["/admin/models", "/status"] {
        let (status, answer) = admin_call(&c, &format!("{url}{path}"), TOKEN, None).await;
        assert_eq!(status, 200, "{answer}");
        let row = model_row(&answer, "big_mlp");
        assert_eq!(row["state"], "UNLOADED", "{path}: {answer}");
        assert_eq!(row["reason"], reason.as_str(), "{path}: {answer}");
        // A version merely not loaded yet has no reason to show.
        assert!(
            model_row(&answer, "small_ops").get("reason").is_none(),
            "{path}: {answer}"
        );
    }
}
