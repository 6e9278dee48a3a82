//! Precomputed predictions served by key over real HTTP (docs/jobs.md, "Serving the results"):
//! a job submitted with `publish: true` answers `GET /v2/models/mlp/predictions/{key}` as the
//! model answers online; a missing key is 404, or falls through to online inference with
//! `POST`; a newer publishing job that fails leaves the previous results serving, their age in
//! the metrics; the table is back after a restart; a newer job that succeeds replaces it.

mod common;

use std::time::Duration;

use common::jobs::*;
use common::*;
use serde_json::{json, Value};

async fn publish(c: &reqwest::Client, url: &str, input: &std::path::Path, output: &str) -> Value {
    let dir = input.parent().unwrap();
    let (status, submitted) = submit(
        c,
        url,
        json!({"model": "mlp", "input": input, "output": dir.join(output), "publish": true}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    assert_eq!(submitted["publish"], true);
    let id = submitted["id"].as_str().unwrap();
    wait_until(c, url, id, Duration::from_secs(30), finished).await
}

/// GET of a key: status, body, and the `Age` and `x-prediction-source` headers.
async fn lookup(c: &reqwest::Client, url: &str, key: &str) -> (u16, Value, Option<u64>, String) {
    let response = c
        .get(format!("{url}/v2/models/mlp/predictions/{key}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let age = header("age").map(|a| a.parse().unwrap());
    let source = header("x-prediction-source").unwrap_or_default();
    (status, response.json().await.unwrap(), age, source)
}

fn assert_same_outputs(table: &Value, online: &Value, what: &str) {
    for output in online["outputs"].as_array().unwrap() {
        let name = output["name"].as_str().unwrap();
        assert_close(&output_f32(table, name), &output_f32(online, name), what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn published_predictions_are_served_by_key_through_a_failed_refresh_and_a_restart() {
    let dir = scratch("published");
    let jobs_dir = dir.join("jobs");
    let a = server(&jobs_dir);
    let url = format!("http://{}", a.addr);
    let c = client();
    let (status, none) = get(&c, &format!("{url}/v2/models/mlp/predictions/row-1")).await;
    assert_eq!(status, 404, "{none}");
    assert!(none["error"]
        .as_str()
        .unwrap()
        .contains("no published predictions"));

    let input = dir.join("in.jsonl");
    write_input(&input, 300);
    let first = publish(&c, &url, &input, "first.jsonl").await;
    assert_eq!(first["state"], "succeeded", "{first}");
    let first_id = first["id"].as_str().unwrap();

    let (status, info) = get(&c, &format!("{url}/v2/models/mlp/predictions")).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["job"], first_id);
    assert_eq!(info["keys"], 300);
    // The status page shows it, without the server's paths.
    let (status, page) = call(
        &c,
        reqwest::Method::GET,
        &format!("{url}/status"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["jobs"]["states"]["succeeded"], 1, "{page}");
    assert_eq!(page["jobs"]["predictions"][0]["model"], "mlp");
    assert_eq!(page["jobs"]["predictions"][0]["keys"], 300);
    assert!(page["jobs"]["predictions"][0].get("output").is_none());

    // A key answers as the model does online, with the time it was computed.
    let (status, answer, age, source) = lookup(&c, &url, "row-7").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((age, source.as_str()), (Some(0), "table"));
    assert_eq!(answer["key"], "row-7");
    assert_eq!(answer["job"], first_id);
    assert_eq!(answer["model_version"], "1");
    assert_eq!(answer["sha256"], MLP_SHA);
    assert!(answer["computed_unix_ms"].as_u64().unwrap() > 0);
    let (status, online) = post(&c, &format!("{url}/v2/models/mlp/infer"), &row(7)).await;
    assert_eq!(status, 200, "{online}");
    assert_same_outputs(&answer, &online, "row-7 from the table");

    // A missing key: 404 by GET; by POST with its inputs, online inference.
    let (status, missing, _, _) = lookup(&c, &url, "row-5000").await;
    assert_eq!(status, 404, "{missing}");
    assert!(
        missing["error"].as_str().unwrap().contains("row-5000"),
        "{missing}"
    );
    for (key, i, expected_source) in [("row-5000", 5000, "online"), ("row-7", 7, "table")] {
        let response = c
            .post(format!("{url}/v2/models/mlp/predictions/{key}"))
            .json(&row(i))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let source = response.headers()["x-prediction-source"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(source, expected_source, "{key}");
        let body: Value = response.json().await.unwrap();
        let (_, online) = post(&c, &format!("{url}/v2/models/mlp/infer"), &row(i)).await;
        assert_same_outputs(&body, &online, key);
    }
    // A bad body with a missing key is the online API's 400.
    let response = c
        .post(format!("{url}/v2/models/mlp/predictions/row-5001"))
        .json(&json!({"inputs": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // A newer publishing job that fails (a malformed row, on_error: stop) leaves the first
    // results serving; the refresh failure and their age are in the metrics.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, format!("{}\nnot json\n", row(1))).unwrap();
    let failed = publish(&c, &url, &bad, "second.jsonl").await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let (status, answer, _, _) = lookup(&c, &url, "row-7").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["job"], first_id);
    let (_, info) = get(&c, &format!("{url}/v2/models/mlp/predictions")).await;
    assert_eq!(info["newer_job_failed"]["job"], failed["id"], "{info}");
    let metrics = metrics_text(&c, &url).await;
    for series in [
        "streamserve_predictions_refresh_failures_total{model=\"mlp\"} 1",
        "streamserve_predictions_keys{model=\"mlp\"} 300",
        "streamserve_predictions_age_seconds{model=\"mlp\"} ",
        "streamserve_predictions_lookups_total{model=\"mlp\",result=\"hit\"} ",
        "streamserve_predictions_lookups_total{model=\"mlp\",result=\"online\"} 1",
        "streamserve_jobs{state=\"failed\"} 1",
        "streamserve_job_rows_total{model=\"mlp\"} ",
    ] {
        assert!(metrics.contains(series), "no '{series}' in\n{metrics}");
    }
    drop(c);
    a.shutdown().await;

    // Back after a restart; then a newer job that succeeds replaces the table whole.
    let b = server(&jobs_dir);
    let url = format!("http://{}", b.addr);
    let c = client();
    let (status, answer, _, _) = lookup(&c, &url, "row-7").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["job"], first_id);
    let few = dir.join("few.jsonl");
    write_input(&few, 10);
    let third = publish(&c, &url, &few, "third.jsonl").await;
    assert_eq!(third["state"], "succeeded", "{third}");
    let (status, answer, _, _) = lookup(&c, &url, "row-7").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["job"], third["id"]);
    assert_eq!(lookup(&c, &url, "row-200").await.0, 404);
    b.shutdown().await;
}

/// A published answer is one model version's output: a key scoped to another version of the
/// model may not read it (as it may not call that version), one scoped to that version may.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_scoped_to_another_version_may_not_read_its_answers() {
    let dir = scratch("predictions-version-scope");
    let entry = |name: &str, key: &str, models: &str| {
        let sha = hex::encode(streamserve::access::keys::hash(key));
        format!("[[keys]]\nname = \"{name}\"\nsha256 = \"{sha}\"\nmodels = [\"{models}\"]\n\n")
    };
    let (v1, v2) = (
        streamserve::access::keys::new_key().unwrap(),
        streamserve::access::keys::new_key().unwrap(),
    );
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        entry("v1", &v1, "mlp:1") + &entry("v2", &v2, "mlp:2"),
    )
    .unwrap();
    let jobs_dir = dir.join("jobs");
    let running = start_running(&model_dir(&manifest()), move |config| {
        config.admin_token = Some(TOKEN.into());
        config.jobs_dir = jobs_dir;
        config.api_keys = Some(keys);
    });
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("rows.jsonl");
    write_input(&input, 4);
    let job = publish(&c, &url, &input, "out.jsonl").await;
    assert_eq!(job["state"], "succeeded", "{job}");

    let read = |key: String| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let response = c
                .get(format!("{url}/v2/models/mlp/predictions/row-1"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let (status, body) = read(v1.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = read(v2.clone()).await;
    assert!(
        status == 403 && body.contains("version '1'"),
        "{status} {body}"
    );
    // POST (lookup, else online inference) too.
    let response = c
        .post(format!("{url}/v2/models/mlp/predictions/row-1"))
        .bearer_auth(&v2)
        .json(&row(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}
