//! Finished batch jobs are kept for a while, not forever (docs/jobs.md, "Retention"): past
//! `jobs_retention_secs` a succeeded, failed or cancelled job is gone from the API (404, as an
//! unknown job) and its state file from the jobs directory, while its output stays and a job
//! still running is never removed; beyond `jobs_keep_finished` the oldest finished go first,
//! also when the server starts on a directory that holds more.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::jobs::*;
use common::*;
use serde_json::{json, Value};

/// A jobs server on `jobs_dir` with this retention.
fn retaining(jobs_dir: &Path, secs: u64, keep: usize) -> streamserve::server::Running {
    let jobs_dir = jobs_dir.to_path_buf();
    start_running(&model_dir(&manifest()), move |config| {
        config.admin_token = Some(TOKEN.into());
        config.jobs_dir = jobs_dir;
        config.drain_secs = 1;
        config.jobs_retention_secs = secs;
        config.jobs_keep_finished = keep;
    })
}

async fn status_of(c: &reqwest::Client, url: &str, id: &str) -> (u16, Value) {
    let url = format!("{url}/v2/jobs/{id}");
    call(c, reqwest::Method::GET, &url, None, Some(TOKEN)).await
}

async fn listed(c: &reqwest::Client, url: &str) -> Vec<String> {
    let url = format!("{url}/v2/jobs");
    let (status, list) = call(c, reqwest::Method::GET, &url, None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{list}");
    let ids = list["jobs"].as_array().unwrap().iter();
    ids.map(|j| j["id"].as_str().unwrap().to_string()).collect()
}

/// Submits a job of `rows` rows into `dir` as `name` and returns its id.
async fn submitted(
    c: &reqwest::Client,
    url: &str,
    dir: &Path,
    (name, rows): (&str, usize),
    extra: Value,
) -> String {
    let input = dir.join(format!("{name}.in.jsonl"));
    write_input(&input, rows);
    let mut body =
        json!({"model": "mlp", "input": input, "output": dir.join(format!("{name}.out.jsonl"))});
    for (field, value) in extra.as_object().unwrap() {
        body[field] = value.clone();
    }
    let (status, job) = submit(c, url, body).await;
    assert_eq!(status, 202, "{job}");
    job["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_removed_after_its_retention_its_output_kept_and_a_running_one_stays() {
    let dir = scratch("jobs-retention-age");
    let jobs_dir = dir.join("jobs");
    let running = retaining(&jobs_dir, 2, 1000);
    let url = format!("http://{}", running.addr);
    let c = client();
    // A job that runs far longer than the retention: 30 rows at 2 rows/s.
    let slow = ("slow", 30);
    let slow = submitted(&c, &url, &dir, slow, json!({"max_rows_per_sec": 2})).await;
    let done = submitted(&c, &url, &dir, ("done", 5), json!({})).await;
    let job = wait_until(&c, &url, &done, Duration::from_secs(30), finished).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let state_file = jobs_dir.join(format!("{done}.json"));
    assert!(state_file.exists());
    let start = Instant::now();
    loop {
        let (status, job) = status_of(&c, &url, &done).await;
        if status == 404 {
            break;
        }
        assert_eq!(status, 200, "{job}");
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still kept past its retention: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Gone as an unknown job is, from the list and the directory; what it wrote stays.
    let (_, unknown) = status_of(&c, &url, "job-000000000000").await;
    let (_, gone) = status_of(&c, &url, &done).await;
    assert_eq!(
        gone["error"].as_str().map(|e| e.replace(&done, "ID")),
        unknown["error"]
            .as_str()
            .map(|e| e.replace("job-000000000000", "ID"))
    );
    assert!(!listed(&c, &url).await.contains(&done));
    assert!(!state_file.exists());
    assert_eq!(output_lines(&dir.join("done.out.jsonl")).len(), 5);
    // The slow job, older than the retention, is still running and listed.
    let (status, job) = status_of(&c, &url, &slow).await;
    assert_eq!(
        (status, job["state"].as_str()),
        (200, Some("running")),
        "{job}"
    );
    assert!(listed(&c, &url).await.contains(&slow));
    // Once it ends (cancelled), its time starts.
    let url_slow = format!("{url}/v2/jobs/{slow}");
    let (status, job) = call(&c, reqwest::Method::DELETE, &url_slow, None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{job}");
    let start = Instant::now();
    while status_of(&c, &url, &slow).await.0 != 404 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "cancelled job kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!jobs_dir.join(format!("{slow}.json")).exists());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_count_the_oldest_finished_jobs_go_first_and_at_start_too() {
    let dir = scratch("jobs-retention-count");
    let jobs_dir = dir.join("jobs");
    // No age limit: only the count.
    let running = retaining(&jobs_dir, 0, 2);
    let url = format!("http://{}", running.addr);
    let c = client();
    let mut ids = Vec::new();
    for name in ["first", "second", "third"] {
        let id = submitted(&c, &url, &dir, (name, 5), json!({})).await;
        wait_until(&c, &url, &id, Duration::from_secs(30), finished).await;
        ids.push(id);
    }
    // Removed when the third ended (a moment after it shows `succeeded`).
    let start = Instant::now();
    let kept = [ids[2].clone(), ids[1].clone()];
    while listed(&c, &url).await != kept {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            listed(&c, &url).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_of(&c, &url, &ids[0]).await.0, 404);
    assert!(!jobs_dir.join(format!("{}.json", ids[0])).exists());
    assert_eq!(output_lines(&dir.join("first.out.jsonl")).len(), 5);
    running.shutdown().await;
    // A server started with a smaller bound on that directory keeps only the newest.
    let running = retaining(&jobs_dir, 0, 1);
    let url = format!("http://{}", running.addr);
    assert_eq!(listed(&c, &url).await, [ids[2].clone()]);
    assert!(!jobs_dir.join(format!("{}.json", ids[1])).exists());
    assert!(jobs_dir.join(format!("{}.json", ids[2])).exists());
    running.shutdown().await;
}
