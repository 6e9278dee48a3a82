//! The jobs directory is the server's, not the client's: when it cannot be made (the image's
//! read-only working directory, a wrong `--jobs-dir`), a submission gets a 5xx naming the
//! directory, not a 400 that tells the client to fix its request.

use crate::common;

use common::jobs::*;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_directory_the_server_cannot_make_is_a_server_error() {
    let dir = scratch("unmakeable");
    // Absent at start (no jobs to resume), then a file where its parent should be: no user,
    // root included, can make a directory there.
    let blocker = dir.join("a-file");
    let running = server(&blocker.join("jobs"));
    std::fs::write(&blocker, "").unwrap();
    let url = format!("http://{}", running.addr);
    let input = dir.join("in.jsonl");
    write_input(&input, 3);
    let c = client();
    let (status, answer) = submit(
        &c,
        &url,
        json!({"model": "mlp", "input": input, "output": dir.join("out.jsonl")}),
    )
    .await;
    assert_eq!(status, 500, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("jobs directory") && message.contains("a-file"),
        "{message}"
    );
    // The client's own mistakes found before it stay theirs.
    let (status, answer) = submit(
        &c,
        &url,
        json!({"model": "absent", "input": input, "output": dir.join("o.jsonl")}),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    running.shutdown().await;
}
