//! Models that cannot be served are refused with a reason while the rest keep serving; a full
//! queue sheds with 429 + Retry-After and every request still gets exactly one answer.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn a_hash_mismatch_refuses_only_that_model() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 8

        [[models]]
        name = "mlp_small"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 8
        "#
    ));
    let url = start(&dir, |_| {});
    let c = client();
    let (_, list) = get(&c, &format!("{url}/v2/models")).await;
    let mlp = &list["models"][0];
    assert_eq!(mlp["state"], "UNAVAILABLE");
    assert!(
        mlp["reason"].as_str().unwrap().contains("sha256 mismatch"),
        "{mlp}"
    );
    assert_eq!(list["models"][1]["state"], "READY");

    let (status, body) = post(
        &c,
        &format!("{url}/v2/models/mlp/infer"),
        &mlp_request(&features(1, 1)),
    )
    .await;
    assert_eq!(status, 503);
    assert!(
        body["error"].as_str().unwrap().contains("sha256 mismatch"),
        "{body}"
    );
    assert_eq!(get(&c, &format!("{url}/v2/models/mlp/ready")).await.0, 400);
    let (status, _) = post(
        &c,
        &format!("{url}/v2/models/mlp_small/infer"),
        &mlp_request(&features(1, 1)),
    )
    .await;
    assert_eq!(status, 200);
    // The refused model is reported, not hidden; the server serves what it can.
    assert_eq!(get(&c, &format!("{url}/v2/health/ready")).await.0, 200);
}

#[tokio::test]
async fn gpu_models_fail_clearly_without_a_gpu() {
    if streamserve::runtime::init(None).is_ok() && streamserve::runtime::cuda_available() {
        eprintln!("this ONNX Runtime has CUDA; the CPU-only refusal path is not testable here");
        return;
    }
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "strict_gpu"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        device = "cuda:0"

        [[models]]
        name = "flexible_gpu"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        device = "cuda:1"
        allow_cpu_fallback = true
        max_batch_size = 4
        "#
    ));
    let url = start(&dir, |_| {});
    let c = client();
    let (_, list) = get(&c, &format!("{url}/v2/models")).await;
    let strict = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "strict_gpu")
        .unwrap();
    assert_eq!(strict["state"], "UNAVAILABLE");
    let reason = strict["reason"].as_str().unwrap();
    assert!(
        reason.contains("cuda:0") && reason.contains("CUDA execution provider"),
        "{reason}"
    );
    let (status, meta) = get(&c, &format!("{url}/v2/models/flexible_gpu")).await;
    assert_eq!(status, 200);
    assert_eq!(meta["parameters"]["device"], "cpu");
    let (status, _) = post(
        &c,
        &format!("{url}/v2/models/flexible_gpu/infer"),
        &mlp_request(&features(1, 1)),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn missing_files_and_bad_batch_settings_are_refused() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "gone"
        version = "1"
        file = "nowhere/model.onnx"
        sha256 = "{MLP_SHA}"

        [[models]]
        name = "vad_batched"
        version = "1"
        file = "{{models}}/silero_vad/1/model.onnx"
        sha256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"
        max_batch_size = 8
        "#
    ));
    let url = start(&dir, |_| {});
    let c = client();
    let (_, list) = get(&c, &format!("{url}/v2/models")).await;
    let reason = |name: &str| {
        list["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        reason("gone").contains("cannot read model file"),
        "{}",
        reason("gone")
    );
    assert!(
        reason("vad_batched").contains("set max_batch_size = 0"),
        "{}",
        reason("vad_batched")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_sheds_with_429_and_every_request_is_answered() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        max_batch_size = 1
        max_queue = 2
        "#
    ));
    let url = start(&dir, |_| {});
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let (c, infer) = (c.clone(), infer.clone());
            tokio::spawn(async move {
                let response = c
                    .post(&infer)
                    .json(&mlp_request(&features(i, 1)))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let body: serde_json::Value = response.json().await.unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for task in tasks {
        let (status, retry_after, body) = task.await.unwrap();
        match status {
            200 => {
                assert_eq!(body["outputs"][0]["shape"], json!([1, 16]));
                ok += 1;
            }
            429 => {
                let secs: u64 = retry_after
                    .expect("429 carries Retry-After")
                    .parse()
                    .unwrap();
                assert!(secs >= 1);
                assert!(
                    body["error"].as_str().unwrap().contains("overloaded"),
                    "{body}"
                );
                shed += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(ok + shed, 200, "every request is answered exactly once");
    assert!(ok > 0 && shed > 0, "ok {ok}, shed {shed}");
    // The series exists at 0 from the start: the shed requests must have moved it.
    let metrics = metrics_text(&c, &url).await;
    let counted = sample(
        &metrics,
        "streamserve_shed_total{model=\"mlp\",version=\"1\"}",
    );
    assert!(
        counted.is_some_and(|n| n >= shed as f64),
        "{shed} shed: {metrics}"
    );
}

#[tokio::test]
async fn versions_that_do_not_fit_the_memory_budget_are_refused() {
    // mlp needs about 11 MiB per replica (twice its 5.3 MB file), 22 MiB for two; mlp_small 1.
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        replicas = 2

        [[models]]
        name = "mlp_small"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        "#
    ));
    let url = start(&dir, |config| config.memory_budget_mb = Some(16));
    let c = client();
    let (_, list) = get(&c, &format!("{url}/v2/models")).await;
    let mlp = &list["models"][0];
    // Not loaded, with the reason; it stays loadable should memory free up later.
    assert_eq!(mlp["state"], "UNLOADED");
    let reason = mlp["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not fit") && reason.contains("MiB on cpu"),
        "{reason}"
    );
    let (status, body) = post(
        &c,
        &format!("{url}/v2/models/mlp/infer"),
        &mlp_request(&features(1, 1)),
    )
    .await;
    assert_eq!(status, 503);
    assert!(
        body["error"].as_str().unwrap().contains("does not fit"),
        "{body}"
    );
    assert_eq!(list["models"][1]["state"], "READY");
    let (_, meta) = get(&c, &format!("{url}/v2/models/mlp_small")).await;
    assert_eq!(meta["parameters"]["resources"]["ram_mb"], 1);
}

/// The memory budget is checked before a version's replicas load, not after: a file that does
/// not fit is refused as such without ONNX Runtime ever reading it. (Here the file is not even
/// a model: were it loaded first, the reason would be that it does not parse.)
#[tokio::test]
async fn a_version_that_does_not_fit_is_refused_before_it_loads() {
    use sha2::{Digest, Sha256};
    let not_a_model = vec![7u8; 6 << 20]; // 6 MiB: 12 MiB a replica, against a budget of 8
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "big"
        version = "1"
        file = "big.onnx"
        sha256 = "{}"
        "#,
        hex::encode(Sha256::digest(&not_a_model))
    ));
    std::fs::write(dir.join("big.onnx"), &not_a_model).unwrap();
    let url = start(&dir, |config| config.memory_budget_mb = Some(8));
    let (_, list) = get(&client(), &format!("{url}/v2/models")).await;
    let big = &list["models"][0];
    assert_eq!(big["state"], "UNLOADED", "{big}");
    let reason = big["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not fit") && reason.contains("needs about 12 MiB on cpu"),
        "{reason}"
    );
    // It was the only model: a server that can serve nothing is not ready (a load balancer
    // sends it no traffic), where one with a refused model beside others stays ready.
    assert_eq!(
        get(&client(), &format!("{url}/v2/health/ready")).await.0,
        400
    );
}
