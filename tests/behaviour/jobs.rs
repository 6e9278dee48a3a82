//! Batch prediction jobs over real HTTP (docs/jobs.md): a 100,000-row job beside online
//! traffic, its output equal row by row to the online answers; cancelling; malformed rows
//! skipped or stopping the job; submissions refused at once; and a job that survives a
//! server restart (and a torn last write) with every row written exactly once, in order.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::jobs::*;
use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_runs_beside_online_traffic_and_answers_as_online_requests_do() {
    const ROWS: usize = 100_000;
    let dir = scratch("big");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, ROWS);
    let output = dir.join("out.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    assert_eq!(submitted["rows_total"], ROWS);
    let id = submitted["id"].as_str().unwrap().to_string();

    // Online requests meanwhile, for every 25th row of the job's input.
    let mut online = Vec::new();
    for t in 0..4 {
        let (c, url) = (c.clone(), url.clone());
        online.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in (t * 25..ROWS).step_by(100) {
                let (status, answer) =
                    post(&c, &format!("{url}/v2/models/mlp/infer"), &row(i)).await;
                assert_eq!(status, 200, "online request {i}: {answer}");
                answers.push((i, answer));
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for task in online {
        answers.extend(task.await.unwrap());
    }
    let running_then = job(&c, &url, &id).await;
    let done = wait_until(&c, &url, &id, Duration::from_secs(300), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows_done"], ROWS);
    assert_eq!(done["errors"], 0);
    assert!(!Path::new(&format!("{}.part", output.display())).exists());
    eprintln!("job while online requests ended: {running_then}");

    let lines = output_lines(&output);
    assert_eq!(lines.len(), ROWS);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["line"], i + 1);
        assert_eq!(line["key"], format!("row-{i}"));
        assert_eq!(line["model_version"], "1");
        assert_eq!(line["sha256"], MLP_SHA);
    }
    assert_eq!(answers.len(), ROWS / 25);
    for (i, answer) in &answers {
        for output in answer["outputs"].as_array().unwrap() {
            let name = output["name"].as_str().unwrap();
            assert_close(
                &output_f32(&lines[*i], name),
                &output_f32(answer, name),
                &format!("row {i} output {name}"),
            );
        }
    }
    running.shutdown().await;
    // 100k rows in and out are a few hundred MB.
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_job_leaves_no_output() {
    let dir = scratch("cancel");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, 200);
    let output = dir.join("out.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "max_rows_per_sec": 20}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    wait_until(&c, &url, id, Duration::from_secs(20), |j| {
        j["state"] == "running"
    })
    .await;
    let delete = |c: reqwest::Client, url: String, id: String| async move {
        call(
            &c,
            reqwest::Method::DELETE,
            &format!("{url}/v2/jobs/{id}"),
            None,
            Some(TOKEN),
        )
        .await
    };
    let (status, cancelled) = delete(c.clone(), url.clone(), id.to_string()).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(job(&c, &url, id).await["state"], "cancelled");
    assert!(!output.exists());
    assert!(!Path::new(&format!("{}.part", output.display())).exists());
    let (status, again) = delete(c.clone(), url.clone(), id.to_string()).await;
    assert_eq!(status, 409, "{again}");
    let (status, list) = call(
        &c,
        reqwest::Method::GET,
        &format!("{url}/v2/jobs"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(list["jobs"][0]["id"], id);
    running.shutdown().await;
}

/// 20 rows, of which lines 3 (not JSON), 7 (an unknown input) and 12 (a wrong shape) are bad;
/// line 10 is blank.
fn write_bad_input(path: &Path) {
    let mut lines: Vec<String> = (0..20).map(|i| row(i).to_string()).collect();
    lines[2] = "{\"key\": \"row-2\", \"inputs\": [".into();
    lines[6] = json!({"key": "row-6", "inputs": [{"name": "nope", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).to_string();
    lines[9] = String::new();
    lines[11] = json!({"key": "row-11", "inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).to_string();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_rows_are_skipped_with_their_line_numbers_or_stop_the_job() {
    let dir = scratch("bad");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_bad_input(&input);

    let output = dir.join("skipped.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "on_error": "skip"}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    assert_eq!(submitted["rows_total"], 19);
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(20), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows_done"], 19);
    assert_eq!(done["errors"], 3);
    assert_eq!(done["error_lines"], json!([3, 7, 12]));
    let lines = output_lines(&output);
    let numbers: Vec<u64> = lines.iter().map(|l| l["line"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=20).filter(|n| *n != 10).collect();
    assert_eq!(numbers, expected);
    for line in &lines {
        let bad = [3, 7, 12].contains(&line["line"].as_u64().unwrap());
        assert_eq!(line.get("error").is_some(), bad, "{line}");
        assert_eq!(line.get("outputs").is_some(), !bad, "{line}");
    }
    assert_eq!(lines[6]["key"], "row-6");

    let output = dir.join("stopped.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    assert_eq!(submitted["on_error"], "stop");
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(20), finished).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert!(
        done["message"].as_str().unwrap().starts_with("line 3:"),
        "{done}"
    );
    assert!(!output.exists());
    assert!(!Path::new(&format!("{}.part", output.display())).exists());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_submissions_fail_at_once() {
    let dir = scratch("refused");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, 3);
    let output = dir.join("out.jsonl");
    let jobs = format!("{url}/v2/jobs");

    let (status, body) = submit(
        &c,
        &url,
        json!({"model": "nope", "input": input, "output": output}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let missing = dir.join("missing.jsonl");
    let (status, body) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": missing, "output": output}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("missing.jsonl"),
        "{body}"
    );
    let (status, body) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": dir.join("no/such/dir/out.jsonl")}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not writable"),
        "{body}"
    );
    let (status, body) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": input}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    std::fs::write(&output, "already here").unwrap();
    let (status, body) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("already exists"),
        "{body}"
    );
    let (status, body) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "bogus": 1}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Jobs read and write files on the server: the admin token is required.
    for token in [None, Some("wrong")] {
        let body = json!({"model": "mlp", "input": input, "output": dir.join("x.jsonl")});
        let (status, _) = call(&c, reqwest::Method::POST, &jobs, Some(body), token).await;
        assert_eq!(status, 401);
        let (status, _) = call(&c, reqwest::Method::GET, &jobs, None, token).await;
        assert_eq!(status, 401);
    }
    let (status, body) = call(
        &c,
        reqwest::Method::GET,
        &format!("{jobs}/job-nope"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, list) = call(&c, reqwest::Method::GET, &jobs, None, Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(list["jobs"], json!([]), "no refused submission left a job");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_resumes_after_a_restart_with_every_row_once() {
    const ROWS: usize = 450;
    let dir = scratch("restart");
    let jobs_dir = dir.join("jobs");
    let a = server(&jobs_dir);
    let url = format!("http://{}", a.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, ROWS);
    let output = dir.join("out.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "max_rows_per_sec": 150}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap().to_string();
    let submitted_at = Instant::now();
    // Some chunks checkpointed, not all.
    let then = wait_until(&c, &url, &id, Duration::from_secs(20), |j| {
        j["rows_done"].as_u64().unwrap() >= 100
    })
    .await;
    assert_eq!(then["state"], "running", "{then}");
    // The cap holds: 100 rows at 150 rows/s take at least 0.66 s.
    assert!(
        submitted_at.elapsed() >= Duration::from_millis(600),
        "{:?}",
        submitted_at.elapsed()
    );
    drop(c);
    a.shutdown().await;
    // A crash would leave rows written after the last checkpoint, maybe half a line.
    let part = PathBuf::from(format!("{}.part", output.display()));
    let mut torn = std::fs::read(&part).unwrap();
    torn.extend_from_slice(b"{\"line\": 9999, \"key\": \"torn");
    std::fs::write(&part, torn).unwrap();

    let b = server(&jobs_dir);
    let url = format!("http://{}", b.addr);
    let c = client();
    let done = wait_until(&c, &url, &id, Duration::from_secs(30), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows_done"], ROWS);
    let lines = output_lines(&output);
    assert_eq!(lines.len(), ROWS);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["line"], i + 1, "{line}");
        assert_eq!(line["key"], format!("row-{i}"));
        assert!(line["outputs"].is_array());
    }
    b.shutdown().await;
}

fn cli(url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_streamserve"))
        .arg("jobs")
        .args(["--url", url, "--token", TOKEN])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_jobs_subcommands_submit_follow_list_and_cancel() {
    let dir = scratch("cli");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    // Keys in another field, named by --key-field; no newline after the last line.
    let input = dir.join("in.jsonl");
    let lines: Vec<String> = (0..50)
        .map(|i| {
            let mut line = row(i);
            line["id"] = json!(i);
            line.to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (input, output) = (input.display().to_string(), dir.join("out.jsonl"));
    let out = output.display().to_string();
    let submitted = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            cli(
                &url,
                &[
                    "submit",
                    "mlp",
                    "--input",
                    &input,
                    "--output",
                    &out,
                    "--key-field",
                    "id",
                    "--wait",
                ],
            )
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&submitted.stderr);
    assert!(submitted.status.success(), "{stderr}");
    assert!(stderr.contains("succeeded 50/50 rows"), "{stderr}");
    let job: Value = serde_json::from_slice(&submitted.stdout).unwrap();
    assert_eq!(job["state"], "succeeded");
    let written = output_lines(&output);
    assert_eq!(written.len(), 50);
    assert_eq!(written[49]["key"], 49);
    let id = job["id"].as_str().unwrap().to_string();

    let (listed, status, cancel, missing) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            (
                cli(&url, &["list"]),
                cli(&url, &["status", &id]),
                cli(&url, &["cancel", &id]),
                cli(
                    &url,
                    &[
                        "submit",
                        "mlp",
                        "--input",
                        "/no/such.jsonl",
                        "--output",
                        "/tmp/x",
                    ],
                ),
            )
        }
    })
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("succeeded 50/50"));
    assert!(status.status.success());
    assert!(
        !cancel.status.success(),
        "a finished job cannot be cancelled"
    );
    assert!(String::from_utf8_lossy(&cancel.stderr).contains("409"));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such.jsonl"));
    running.shutdown().await;
}
