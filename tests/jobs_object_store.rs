//! Batch jobs whose input or output is an object in S3-compatible storage (moto's server).
//!
//! A binary of their own: the server reads its object store settings (`AWS_ENDPOINT_URL`,
//! keys, region) from the process environment, as it does in production, so these tests set
//! them, and environment variables are process-wide. Beside the other tests (tests/behaviour)
//! they would point every subprocess and every other server in the process at this store.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use common::fleet::S3;
use common::jobs::*;
use common::*;
use serde_json::json;

/// One S3 server for the binary, with buckets `jobs` and `edges`, and the environment that
/// points the server at it, set once before any test starts a server.
fn object_store() -> &'static S3 {
    static STORE: OnceLock<S3> = OnceLock::new();
    STORE.get_or_init(|| {
        let s3 = S3::start();
        s3.registry("jobs");
        s3.registry("edges");
        for (name, value) in common::fleet::s3_env(&s3.endpoint) {
            std::env::set_var(name, value);
        }
        s3
    })
}

/// `rows` rows of `features` as a float32 `.npy` array [rows, 256], written by numpy.
fn write_npy(path: &Path, rows: usize) {
    let data: Vec<Vec<f32>> = (0..rows).map(|i| features(i as u64, 1)).collect();
    let json = path.with_extension("json");
    std::fs::write(&json, serde_json::to_vec(&data).unwrap()).unwrap();
    let script = "import json, sys, numpy as np\n\
                  np.save(sys.argv[2], np.asarray(json.load(open(sys.argv[1])), dtype='<f4'))";
    let status = std::process::Command::new(repo().join(".venv/bin/python"))
        .args(["-c", script])
        .arg(&json)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "numpy could not write {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_read_and_write_object_storage_and_npy_arrays() {
    use streamserve::registry::Store;
    const ROWS: usize = 120;
    object_store();
    let dir = scratch("objects");
    let jobs_dir = dir.join("jobs");
    let running = server(&jobs_dir);
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, ROWS);
    let data = Store::open("s3://jobs/data").unwrap();
    data.upload("in.jsonl", &input).await.unwrap();

    // An object in, an object out.
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": "s3://jobs/data/in.jsonl", "output": "s3://jobs/out/answers.jsonl"}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    assert_eq!(submitted["input"], "s3://jobs/data/in.jsonl");
    assert_eq!(submitted["output"], "s3://jobs/out/answers.jsonl");
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(30), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows_total"], ROWS);
    let fetched = dir.join("answers.jsonl");
    Store::open("s3://jobs/out")
        .unwrap()
        .download("answers.jsonl", &fetched)
        .await
        .unwrap();
    let lines = output_lines(&fetched);
    assert_eq!(lines.len(), ROWS);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["key"], format!("row-{i}"));
    }
    // Nothing staged is left behind: only the state file.
    let left: Vec<_> = std::fs::read_dir(&jobs_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec![format!("{id}.json")]);

    // A .npy array written by numpy: row i is array[i], keyed by its index.
    let npy = dir.join("rows.npy");
    write_npy(&npy, 40);
    let output = dir.join("npy.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": npy, "output": output}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(30), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let lines = output_lines(&output);
    assert_eq!(lines.len(), 40);
    for i in [0, 17, 39] {
        assert_eq!(lines[i]["key"], i);
        let (_, online) = post(&c, &format!("{url}/v2/models/mlp/infer"), &row(i)).await;
        let name = online["outputs"][0]["name"].as_str().unwrap();
        assert_close(
            &output_f32(&lines[i], name),
            &output_f32(&online, name),
            &format!("npy row {i}"),
        );
    }

    // What can be known at submission fails it.
    for (body, expected) in [
        (
            json!({"model": "mlp", "input": "s3://jobs/data/missing.jsonl", "output": dir.join("x.jsonl")}),
            "does not exist",
        ),
        (
            json!({"model": "mlp", "input": input, "output": "s3://jobs/out/answers.jsonl"}),
            "already exists",
        ),
        (
            json!({"model": "mlp", "input": input, "output": "s3://no-such-bucket/answers.jsonl"}),
            "not writable",
        ),
        (
            json!({"model": "mlp", "input": input, "output": "s3://jobs"}),
            "names no object",
        ),
        (
            json!({"model": "mlp", "input": npy, "output": dir.join("y.jsonl"), "input_name": "nope"}),
            "is not an input of model",
        ),
        (
            json!({"model": "mlp", "input": input, "output": dir.join("z.jsonl"), "input_name": "features"}),
            "input_name is for .npy inputs",
        ),
    ] {
        let (status, refused) = submit(&c, &url, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {refused}");
        let error = refused["error"].as_str().unwrap();
        assert!(error.contains(expected), "{body} -> {error}");
    }
    running.shutdown().await;
}

/// Submissions of one object output at once: one job, the others refused (both once passed
/// while the store was asked, and the second job's upload replaced the first's answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_object_output_submitted_at_once_makes_one_job() {
    object_store();
    let dir = scratch("edges-same-output");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, 5);
    let body = json!({"model": "mlp", "input": input, "output": "s3://edges/out/answers.jsonl",
                      "max_rows_per_sec": 1});
    let tries: Vec<_> = (0..4)
        .map(|_| tokio::spawn(submit_owned(c.clone(), url.clone(), body.clone())))
        .collect();
    let mut statuses = Vec::new();
    for task in tries {
        let (status, answer) = task.await.unwrap();
        if status != 202 {
            assert_eq!(status, 400, "{answer}");
            let error = answer["error"].as_str().unwrap();
            assert!(error.contains("another job is writing it"), "{error}");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    running.shutdown().await;
}

/// A refresh by a job whose output is an object keeps one local copy, the serving table's:
/// the copy of the table it replaced is removed (every refresh kept one more copy of the whole
/// output in the jobs directory), and a copy that nothing serves is removed at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_removes_the_local_copy_of_the_table_it_replaces() {
    object_store();
    let dir = scratch("edges-refresh-copies");
    let jobs_dir = dir.join("jobs");
    let input = dir.join("in.jsonl");
    write_input(&input, 10);
    // Left by an earlier server: a replaced table's copy that nothing serves or needs.
    std::fs::create_dir_all(&jobs_dir).unwrap();
    let left = jobs_dir.join("job-0123456789ab.output.jsonl");
    std::fs::write(&left, "{}\n").unwrap();
    let running = server(&jobs_dir);
    assert!(!left.exists(), "a copy nothing needs is removed at start");
    let url = format!("http://{}", running.addr);
    let c = client();
    let mut copies = Vec::new();
    for n in 0..3 {
        let (status, submitted) = submit(
            &c,
            &url,
            json!({"model": "mlp", "input": input, "publish": true,
                   "output": format!("s3://edges/refresh/answers-{n}.jsonl")}),
        )
        .await;
        assert_eq!(status, 202, "{submitted}");
        let id = submitted["id"].as_str().unwrap().to_string();
        let done = wait_until(&c, &url, &id, Duration::from_secs(30), finished).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        copies.push(jobs_dir.join(format!("{id}.output.jsonl")));
    }
    let (newest, replaced) = copies.split_last().unwrap();
    assert!(newest.exists(), "the serving table's copy stays");
    for copy in replaced {
        assert!(!copy.exists(), "{} is kept", copy.display());
    }
    let (status, answer) = call(
        &c,
        reqwest::Method::GET,
        &format!("{url}/v2/models/mlp/predictions/row-3"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    running.shutdown().await;

    // After a restart the serving copy is still there, and served.
    let running = server(&jobs_dir);
    assert!(newest.exists());
    let url = format!("http://{}", running.addr);
    let (status, answer) = call(
        &c,
        reqwest::Method::GET,
        &format!("{url}/v2/models/mlp/predictions/row-3"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    running.shutdown().await;
}

async fn submit_owned(
    c: reqwest::Client,
    url: String,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    submit(&c, &url, body).await
}
