//! Micro-batching under concurrency: many requests share model calls, and each still gets
//! exactly the answer its own input gets when sent alone (batching never mixes up rows).

use crate::common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_answers_equal_solo_answers() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");

    // Requests of 1 to 4 rows each, so that batches stack uneven requests.
    let inputs: Vec<Vec<f32>> = (0..160u64)
        .map(|i| features(1000 + i, 1 + (i % 4) as usize))
        .collect();
    let mut solo = Vec::new();
    for x in &inputs {
        let (status, response) = post(&c, &infer, &mlp_request(x)).await;
        assert_eq!(status, 200, "{response}");
        solo.push(output_f32(&response, "logits"));
    }

    let tasks: Vec<_> = inputs
        .iter()
        .cloned()
        .map(|x| {
            let (c, infer) = (c.clone(), infer.clone());
            tokio::spawn(async move { post(&c, &infer, &mlp_request(&x)).await })
        })
        .collect();
    let mut largest_batch = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, response) = task.await.unwrap();
        assert_eq!(status, 200, "{response}");
        let rows = inputs[i].len() / 256;
        assert_eq!(response["outputs"][0]["shape"], json!([rows, 16]));
        assert_close(
            &output_f32(&response, "logits"),
            &solo[i],
            &format!("request {i}"),
        );
        largest_batch = largest_batch.max(response["parameters"]["batch_size"].as_u64().unwrap());
    }
    // 160 requests in flight at once against 2 workers: some model calls must have carried
    // more than one request.
    assert!(
        largest_batch > 4,
        "no batching happened (largest batch {largest_batch} rows)"
    );
    assert!(
        largest_batch <= 64,
        "a batch exceeded max_batch_size: {largest_batch}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_datatype_batches_keep_rows_apart() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/typed_ops/infer");
    let tasks: Vec<_> = (0..64i64)
        .map(|i| {
            let (c, infer) = (c.clone(), infer.clone());
            tokio::spawn(async move {
                let a: Vec<i64> = (0..4).map(|j| i * 10 + j).collect();
                let body = json!({"inputs": [
                    {"name": "a", "shape": [1, 4], "datatype": "INT64", "data": a},
                    {"name": "b", "shape": [1, 4], "datatype": "FP64", "data": [i as f64, -1.0, 0.5, 0.0]},
                    {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [true, i % 2 == 0, false, true]}],
                    "outputs": [{"name": "masked"}, {"name": "sum"}]});
                (i, post(&c, &infer, &body).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, (status, r)) = task.await.unwrap();
        assert_eq!(status, 200, "{r}");
        let masked = if i % 2 == 0 {
            json!([i * 10, i * 10 + 1, 0, i * 10 + 3])
        } else {
            json!([i * 10, 0, 0, i * 10 + 3])
        };
        assert_eq!(r["outputs"][0]["name"], "masked");
        assert_eq!(r["outputs"][0]["data"], masked);
        assert_eq!(
            r["outputs"][1]["data"][0],
            json!((i * 10) as f64 + i as f64)
        );
    }
}

/// Silero VAD's state is `[2, batch, 128]`: its requests are stacked on axis 1 (manifest
/// `batch_axes`), and each still gets exactly its own probability and next state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recurrent_state_batches_on_axis_1() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/silero_vad/infer");
    let body = |i: usize| {
        let audio: Vec<f32> = (0..576)
            .map(|t| ((t * (i + 1)) as f32 * 0.01).sin() * (i as f32 / 40.0))
            .collect();
        let state: Vec<f32> = (0..256)
            .map(|t| ((t + i) % 7) as f32 * 0.05 - 0.15)
            .collect();
        json!({"inputs": [
            {"name": "input", "shape": [1, 576], "datatype": "FP32", "data": audio},
            {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": state},
            {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]}]})
    };
    let mut solo = Vec::new();
    for i in 0..48 {
        let (status, r) = post(&c, &infer, &body(i)).await;
        assert_eq!(status, 200, "{r}");
        solo.push((output_f32(&r, "output"), output_f32(&r, "stateN")));
    }
    let tasks: Vec<_> = (0..48)
        .map(|i| {
            let (c, infer, b) = (c.clone(), infer.clone(), body(i));
            tokio::spawn(async move { post(&c, &infer, &b).await })
        })
        .collect();
    let mut largest = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, r) = task.await.unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["outputs"][1]["shape"], json!([2, 1, 128]));
        assert_close(
            &output_f32(&r, "output"),
            &solo[i].0,
            &format!("stream {i} probability"),
        );
        assert_close(
            &output_f32(&r, "stateN"),
            &solo[i].1,
            &format!("stream {i} state"),
        );
        largest = largest.max(r["parameters"]["batch_size"].as_u64().unwrap());
    }
    assert!(largest > 1, "steps were never batched together");
}
