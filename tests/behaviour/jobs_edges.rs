//! Batch jobs at their edges, over real HTTP (docs/jobs.md): a rate cap too high to pace, input
//! lines that are not UTF-8 or only Unicode spaces, row errors quoting megabytes of a row, a
//! line exactly as long as a job reads, a
//! job cancelled while its `.npy` array is staged, a `.npy` job given a key field, the same
//! object output submitted twice at once, a published output indexed while the API is asked,
//! what `streamserve jobs list` says of a job whose staging failed, and a blue/green
//! deployment in the middle of a job.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::jobs::*;
use common::*;
use serde_json::json;

fn part(output: &Path) -> PathBuf {
    PathBuf::from(format!("{}.part", output.display()))
}

/// A rate above a billion rows a second is no pace at all: the job runs as an uncapped one
/// (it once stayed `running` forever, its task dead on a zero-length interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_too_high_to_pace_runs_the_job_uncapped() {
    let dir = scratch("edges-rate");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, 20);
    let output = dir.join("out.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "max_rows_per_sec": u32::MAX}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(20), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows_done"], 20);
    assert_eq!(output_lines(&output).len(), 20);
    running.shutdown().await;
}

/// A line that is not UTF-8 is one malformed row (as the REST API answers such a body 400),
/// not an input the job cannot read; a line of Unicode spaces is a row as the submission
/// counted it, so that `rows_done` ends equal to `rows_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_that_are_not_utf8_or_only_unicode_space_are_malformed_rows() {
    let dir = scratch("edges-utf8");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    let mut bytes = Vec::new();
    writeln!(bytes, "{}", row(0)).unwrap();
    bytes.extend_from_slice(b"{\"key\": \"row-1\", \"inputs\": \"\xff\xfe\"}\n");
    bytes.extend_from_slice("\u{a0}\n".as_bytes());
    writeln!(bytes, "{}", row(3)).unwrap();
    bytes.extend_from_slice(b" \t\n");
    std::fs::write(&input, bytes).unwrap();

    let output = dir.join("skipped.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "on_error": "skip"}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    assert_eq!(submitted["rows_total"], 4);
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(20), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows_done"], 4, "{done}");
    assert_eq!(done["errors"], 2, "{done}");
    assert_eq!(done["error_lines"], json!([2, 3]));
    assert!(
        done["first_errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("UTF-8"),
        "{done}"
    );
    let lines = output_lines(&output);
    let numbers: Vec<u64> = lines.iter().map(|l| l["line"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
    assert_eq!(lines[3]["key"], "row-3");
    assert!(lines[3]["outputs"].is_array());

    let output = dir.join("stopped.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(20), finished).await;
    assert_eq!(done["state"], "failed", "{done}");
    let message = done["message"].as_str().unwrap();
    assert!(message.starts_with("line 2: not UTF-8"), "{message}");
    assert!(!output.exists() && !part(&output).exists());
    running.shutdown().await;
}

/// A row error quoting a huge name is kept short: the job's first errors are in its state
/// file, rewritten at every checkpoint, and in every answer about it (they once held the
/// whole name, 20 rows of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_errors_that_quote_a_huge_row_are_kept_short() {
    let dir = scratch("edges-long-error");
    let jobs_dir = dir.join("jobs");
    let running = server(&jobs_dir);
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    let name = "n".repeat(1 << 20);
    let bad = json!({"key": "bad", "inputs": [{"name": name, "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    let text: String = (0..25).map(|_| format!("{bad}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let output = dir.join("out.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "on_error": "skip"}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(30), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["errors"], 25);
    let error = done["first_errors"][0]["error"].as_str().unwrap();
    assert!(error.contains("has no input 'nnnn"), "{error}");
    assert!(error.len() < 2048, "{} bytes", error.len());
    let state = std::fs::metadata(jobs_dir.join(format!("{id}.json"))).unwrap();
    assert!(state.len() < 100_000, "state file of {} bytes", state.len());
    for line in output_lines(&output) {
        assert!(line["error"].as_str().unwrap().len() < 2048);
    }
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The submission takes a line of exactly `MAX_LINE_BYTES` bytes (its newline not counted),
/// and so does the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_exactly_as_long_as_the_bound_is_run() {
    use streamserve::jobs::MAX_LINE_BYTES;
    let dir = scratch("edges-long");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    let mut long = row(0).to_string().into_bytes();
    long.resize(MAX_LINE_BYTES, b' ');
    long.push(b'\n');
    writeln!(long, "{}", row(1)).unwrap();
    std::fs::write(&input, long).unwrap();
    let output = dir.join("out.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    assert_eq!(submitted["rows_total"], 2);
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, Duration::from_secs(30), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let lines = output_lines(&output);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["key"], "row-0");
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A float32 `.npy` array of `rows` rows of 256, written by hand (version 1 header).
fn write_big_npy(path: &Path, rows: usize) {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 256), }}");
    // Magic (6) + version (2) + length (2) + dict + newline, padded to a multiple of 64.
    let len = (10 + dict.len() + 1).div_ceil(64) * 64 - 10;
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(len as u16).to_le_bytes());
    bytes.extend_from_slice(format!("{dict:<width$}\n", width = len - 1).as_bytes());
    // Values whose JSON is long (not "0.0"), so that writing the rows takes a while.
    let row: Vec<u8> = (0..256u32)
        .flat_map(|j| (0.1234567f32 + j as f32 * 1.000_001).to_le_bytes())
        .collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    file.write_all(&bytes).unwrap();
    for _ in 0..rows {
        file.write_all(&row).unwrap();
    }
    file.flush().unwrap();
}

/// Files in the jobs directory besides the state files.
fn staged_files(jobs_dir: &Path) -> Vec<String> {
    std::fs::read_dir(jobs_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| !name.ends_with(".json"))
        .collect()
}

/// Cancelling a job while its array is converted stops the conversion and leaves nothing in
/// the jobs directory (the half-written rows were once left there, whole, after the cancel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_staging_leaves_nothing_staged() {
    let dir = scratch("edges-stage-cancel");
    let jobs_dir = dir.join("jobs");
    let running = server(&jobs_dir);
    let url = format!("http://{}", running.addr);
    let c = client();
    let npy = dir.join("rows.npy");
    write_big_npy(&npy, 60_000);
    let output = dir.join("out.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": npy, "output": output}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    wait_until(&c, &url, id, Duration::from_secs(20), |j| {
        j["state"] == "running"
    })
    .await;
    let (status, cancelled) = call(
        &c,
        reqwest::Method::DELETE,
        &format!("{url}/v2/jobs/{id}"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(
        cancelled["rows_total"],
        json!(null),
        "cancelled while staging"
    );
    // Long enough for the whole array to have been converted, had the cancel not stopped it.
    let start = Instant::now();
    loop {
        let left = staged_files(&jobs_dir);
        if left.is_empty() && start.elapsed() > Duration::from_secs(5) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "left in the jobs directory: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(job(&c, &url, id).await["state"], "cancelled");
    assert!(!output.exists() && !part(&output).exists());
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `.npy` input takes no key field; `streamserve jobs list` says why a job whose staging
/// failed ended, not that it is staging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_npy_job_refuses_a_key_field_and_the_cli_says_why_its_staging_failed() {
    let dir = scratch("edges-cli");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    // A half-precision array: refused when staged, naming the cast to make.
    let npy = dir.join("half.npy");
    let dict = "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 256), }";
    let mut bytes = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
    bytes.extend_from_slice(format!("{dict:<117}\n").as_bytes());
    bytes.resize(bytes.len() + 2 * 256 * 2, 0);
    std::fs::write(&npy, bytes).unwrap();
    // Its rows are keyed by their index: a key field is refused at once (it once made every
    // row's key null, and a job publishing them failed at its end).
    let (status, refused) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": npy, "output": dir.join("out.jsonl"), "key_field": "id"}),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("key_field"),
        "{refused}"
    );
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": npy, "output": dir.join("out.jsonl"), "key_field": "key"}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap().to_string();
    let done = wait_until(&c, &url, &id, Duration::from_secs(20), finished).await;
    assert_eq!(done["state"], "failed", "{done}");
    let listed = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_streamserve"))
            .args(["jobs", "--url", &url, "--token", TOKEN, "list"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(listed.status.success());
    let stdout = String::from_utf8_lossy(&listed.stdout);
    let line = stdout.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(
        line.contains("failed") && line.contains("cast to float32"),
        "{line}"
    );
    assert!(!line.contains("staging the input"), "{line}");
    running.shutdown().await;
}

/// Publishing reads the whole output to index it; the jobs API answers meanwhile (it once
/// waited for the index, and every other request on that HTTP worker with it: an online
/// request stalled 0.36 s behind a 122 MB output), and a cancel then is refused: every row is
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_jobs_api_answers_while_a_published_output_is_indexed() {
    const ROWS: usize = 6;
    let dir = scratch("edges-publish-lock");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    // Long keys make a large output of few rows: seconds of indexing on a slow machine.
    let input = dir.join("in.jsonl");
    let text: String = (0..ROWS)
        .map(|i| {
            let mut line = row(i);
            line["key"] = json!(format!("{i}-{}", "k".repeat(24 << 20)));
            format!("{line}\n")
        })
        .collect();
    std::fs::write(&input, text).unwrap();
    let output = dir.join("out.jsonl");
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "publish": true}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    let (mut finishing, mut since, mut cancel) = (0, None, None);
    let done = loop {
        let job = job(&c, &url, id).await;
        if finished(&job) {
            break job;
        }
        if job["rows_done"] == ROWS {
            finishing += 1;
            // Past the last checkpoint (a cancel before the output is renamed still wins).
            let since = *since.get_or_insert_with(Instant::now);
            if cancel.is_none() && since.elapsed() > Duration::from_millis(100) {
                cancel = Some(
                    call(
                        &c,
                        reqwest::Method::DELETE,
                        &format!("{url}/v2/jobs/{id}"),
                        None,
                        Some(TOKEN),
                    )
                    .await,
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(done["state"], "succeeded", "{done}");
    let (status, refused) = cancel.expect("the job was seen with every row written");
    assert_eq!(status, 409, "{refused}");
    assert!(
        finishing >= 3,
        "the API answered {finishing} times while the output was indexed"
    );
    let (status, _) = get(&c, &format!("{url}/v2/models/mlp/predictions")).await;
    assert_eq!(status, 200);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job that names no version follows a blue/green deployment made while it runs: the rows
/// before the switch are answered by version 1, the rest by version 2, every row once and in
/// order, none failed (rows sent to version 1 after it was taken out of service go again to
/// version 2), and each line names the file that answered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_during_a_job_moves_the_rest_of_it_to_the_new_version() {
    const ROWS: usize = 3_000;
    let dir = scratch("edges-deploy");
    let manifest = format!(
        "{}\n[[models]]\nname = \"mlp\"\nversion = \"2\"\nfile = \"{{models}}/mlp_small/1/model.onnx\"\nsha256 = \"{MLP_SMALL_SHA}\"\nmax_batch_size = 64\nload = \"lazy\"\n",
        manifest()
    );
    let jobs_dir = dir.join("jobs");
    let running = start_running(&model_dir(&manifest), move |config| {
        config.admin_token = Some(TOKEN.into());
        config.jobs_dir = jobs_dir;
        config.drain_secs = 1;
    });
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, ROWS);
    let output = dir.join("out.jsonl");
    // About 3 s of rows: the deployment lands in the middle.
    let (status, submitted) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": output, "max_rows_per_sec": 1000}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    wait_until(&c, &url, id, Duration::from_secs(20), |job| {
        job["rows_done"].as_u64() > Some(0)
    })
    .await;
    let (status, deployed) = call(
        &c,
        reqwest::Method::POST,
        &format!("{url}/admin/models/mlp/deploy"),
        Some(json!({"version": "2", "strategy": "blue_green"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{deployed}");
    let done = wait_until(&c, &url, id, Duration::from_secs(60), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows_done"], ROWS, "{done}");
    assert_eq!(done["errors"], 0, "{done}");

    let lines = output_lines(&output);
    assert_eq!(lines.len(), ROWS);
    let mut switched_at = None;
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["line"], i + 1);
        assert_eq!(line["key"], format!("row-{i}"));
        let version = line["model_version"].as_str().unwrap();
        let sha = if version == "1" {
            MLP_SHA
        } else {
            MLP_SMALL_SHA
        };
        assert_eq!(line["sha256"], sha, "line {}: {line}", i + 1);
        match (version, switched_at) {
            ("1", None) => {}
            ("2", None) => switched_at = Some(i),
            ("2", Some(_)) => {}
            _ => panic!("line {} went back to version {version}: {line}", i + 1),
        }
    }
    let switched_at = switched_at.expect("the rows after the deployment went to version 2");
    assert!(switched_at > 0 && switched_at < ROWS, "{switched_at}");
    running.shutdown().await;
}
