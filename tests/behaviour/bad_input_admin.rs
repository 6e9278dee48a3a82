//! Hostile or careless admin requests against a real server: each class of bad input is
//! refused with its status and a message saying what is allowed, while a well-behaved client
//! keeps getting 200s; no admin number makes the server allocate in proportion to it; and a
//! fault is applied exactly the number of times asked.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "test-token";

/// The tests of this binary run one at a time: one measures the process's resident memory,
/// which another test's server start-up would move.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn manifest() -> String {
    format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        replicas = 2
        max_batch_size = 8

        [[models]]
        name = "dep"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"

        [[models]]
        name = "dep"
        version = "2"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        load = "lazy"

        [[models]]
        name = "victim"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 8
        "#
    )
}

async fn admin_raw(c: &reqwest::Client, url: &str, path: &str, body: &str) -> (u16, Value) {
    post_raw(
        c,
        &format!("{url}{path}"),
        body.as_bytes().to_vec(),
        &[
            ("authorization", format!("Bearer {TOKEN}")),
            ("content-type", "application/json".into()),
        ],
    )
    .await
}

async fn admin(c: &reqwest::Client, url: &str, path: &str, body: Value) -> (u16, Value) {
    admin_raw(c, url, path, &body.to_string()).await
}

/// Clients sending valid `mlp` inferences (three at a time) until told to stop.
struct GoodClient {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

impl GoodClient {
    fn start(url: &str) -> GoodClient {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..3u64)
            .map(|seed| {
                let (flag, url) = (stop.clone(), format!("{url}/v2/models/mlp/infer"));
                tokio::spawn(async move {
                    let c = client();
                    let mut statuses = Vec::new();
                    let mut i = seed * 1_000_000;
                    while !flag.load(Ordering::Relaxed) || statuses.is_empty() {
                        i += 1;
                        let (status, body) = post(&c, &url, &mlp_request(&features(i, 2))).await;
                        if status == 200 {
                            assert_eq!(body["outputs"][0]["shape"], json!([2, 16]), "{body}");
                        }
                        statuses.push(status);
                    }
                    statuses
                })
            })
            .collect();
        GoodClient { stop, tasks }
    }

    /// Every status the clients got.
    async fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        let mut statuses = Vec::new();
        for task in self.tasks {
            statuses.extend(task.await.unwrap());
        }
        statuses
    }
}

/// Resident memory of this process (the server runs in it), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

async fn router_status(c: &reqwest::Client, url: &str, model: &str) -> Value {
    let (_, list) = common::admin_call(c, &format!("{url}/admin/models"), TOKEN, None).await;
    list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model && m["state"] == "SERVING")
        .unwrap_or_else(|| panic!("{model} is not serving: {list}"))["router"]
        .clone()
}

async fn wait_healthy(c: &reqwest::Client, url: &str, model: &str) {
    for _ in 0..200 {
        if router_status(c, url, model).await["healthy_replicas"] == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{model} did not get its replica back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_admin_input_is_refused_while_inference_carries_on() {
    let _serial = SERIAL.lock().await;
    let url = start(&model_dir(&manifest()), |config| {
        config.admin_token = Some(TOKEN.into())
    });
    let c = client();
    let good = GoodClient::start(&url);
    let faults = "/admin/models/mlp/faults";

    // Counts, durations and replicas out of bounds.
    let rss_before = rss_bytes();
    for count in [1_000_000_000u64, 10_000_000, 1001] {
        let body = json!({"fault": {"kind": "panic"}, "count": count});
        expect(
            admin(&c, &url, faults, body).await,
            400,
            "count must be in 1..=1000",
        );
    }
    expect(
        admin(
            &c,
            &url,
            faults,
            json!({"fault": {"kind": "panic"}, "count": 0}),
        )
        .await,
        400,
        "count must be in 1..=1000",
    );
    expect(
        admin(
            &c,
            &url,
            faults,
            json!({"fault": {"kind": "panic"}, "count": -5}),
        )
        .await,
        400,
        "malformed fault request",
    );
    for kind in ["hang", "slow"] {
        let body = json!({"fault": {"kind": kind, "ms": 1_000_000_000_000u64}});
        expect(
            admin(&c, &url, faults, body).await,
            400,
            "fault ms must be in 1..=600000",
        );
    }
    expect(
        admin(
            &c,
            &url,
            faults,
            json!({"fault": {"kind": "panic"}, "replica": 9}),
        )
        .await,
        400,
        "replica must be in 0..2",
    );
    let long_version = "1".repeat(10_000);
    expect(
        admin(
            &c,
            &url,
            faults,
            json!({"fault": {"kind": "panic"}, "version": long_version}),
        )
        .await,
        400,
        "version must be at most 64 characters",
    );
    // Many accepted calls of the largest count on one replica are one entry, not copies.
    for _ in 0..200 {
        let body = json!({"fault": {"kind": "hang", "ms": 1}, "replica": 0, "count": 1000, "version": "1"});
        let (status, answer) = admin(&c, &url, "/admin/models/victim/faults", body).await;
        assert_eq!(status, 200, "{answer}");
    }
    let rss_after = rss_bytes();
    eprintln!(
        "resident memory: {} MB before the oversized counts, {} MB after them and 200 calls of count 1000",
        rss_before >> 20,
        rss_after >> 20
    );
    let grown = rss_after.saturating_sub(rss_before);
    assert!(
        grown < 50 << 20,
        "resident memory grew by {} MB",
        grown >> 20
    );
    // Alternating faults need entries of their own, and those are bounded.
    let mut refused = None;
    for i in 0..100 {
        let fault = if i % 2 == 0 {
            json!({"kind": "panic"})
        } else {
            json!({"kind": "slow", "ms": 1})
        };
        let (status, answer) = admin(
            &c,
            &url,
            "/admin/models/victim/faults",
            json!({"fault": fault, "replica": 0}),
        )
        .await;
        if status != 200 {
            refused = Some((status, answer));
            break;
        }
    }
    expect(
        refused.expect("the fault book is bounded"),
        409,
        "different queued faults",
    );

    // Rollouts: steps and step_secs.
    let deploy = "/admin/models/dep/deploy";
    for (steps, needle) in [
        (json!([0, 100]), "got 0"),
        (json!([50, 25, 100]), "got 25 after 50"),
        (json!([50, 50, 100]), "got 50 after 50"),
        (json!([25, 50]), "does not end at 100"),
        (json!([50, 101]), "got 101"),
        (json!([]), "got none"),
        (json!((1..=40).collect::<Vec<u32>>()), "at most 20"),
    ] {
        let body = json!({"version": "2", "strategy": "canary", "steps": steps, "step_secs": 1});
        let got = admin(&c, &url, deploy, body).await;
        expect(
            got.clone(),
            400,
            "strictly increasing percentages in 1..=100 ending at 100",
        );
        expect(got, 400, needle);
    }
    for (strategy, secs) in [("canary", 0u64), ("rolling", 0), ("canary", 86_400)] {
        let body =
            json!({"version": "2", "strategy": strategy, "steps": [50, 100], "step_secs": secs});
        expect(
            admin(&c, &url, deploy, body).await,
            400,
            "step_secs must be in 1..=3600",
        );
    }
    expect(
        admin(
            &c,
            &url,
            deploy,
            json!({"version": "9".repeat(65), "strategy": "blue_green"}),
        )
        .await,
        400,
        "at most 64 characters",
    );
    expect(
        admin(
            &c,
            &url,
            "/admin/models/nope/deploy",
            json!({"version": "2", "strategy": "blue_green"}),
        )
        .await,
        404,
        "unknown model 'nope'",
    );

    // Rollback: unknown model, nothing to go back to, and a repeated rollback.
    expect(
        admin(&c, &url, "/admin/models/nope/rollback", json!({})).await,
        404,
        "unknown model 'nope'",
    );
    expect(
        admin(&c, &url, "/admin/models/dep/rollback", json!({})).await,
        409,
        "no previous version",
    );
    let (status, answer) = admin(
        &c,
        &url,
        deploy,
        json!({"version": "2", "strategy": "blue_green"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = admin(&c, &url, "/admin/models/dep/rollback", json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["from"].as_str(), answer["to"].as_str()),
        (Some("2"), Some("1"))
    );
    expect(
        admin(&c, &url, "/admin/models/dep/rollback", json!({})).await,
        409,
        "no previous version",
    );
    let (_, list) = get(&c, &format!("{url}/v2/models")).await;
    assert!(
        list["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "dep" && m["version"] == "1" && m["default"] == true),
        "the second rollback did not flip back: {list}"
    );

    // Malformed bodies, on every admin POST that takes one.
    for path in [
        faults,
        deploy,
        "/admin/models/mlp/load",
        "/admin/models/mlp/unload",
    ] {
        let what = if path == faults {
            "malformed fault request"
        } else {
            "malformed admin request"
        };
        expect(admin_raw(&c, &url, path, "{\"fault\": ").await, 400, what);
        expect(admin_raw(&c, &url, path, "[1, 2, 3]").await, 400, what);
        expect(admin_raw(&c, &url, path, "{\"bogus\": 1}").await, 400, what);
    }

    // An admin body is a small JSON object: a large one is refused before it is buffered,
    // a wrong method gets 405, and without the token nothing is read at all.
    let big = format!("{{\"version\": \"{}\"}}", "9".repeat(100_000));
    expect(
        admin_raw(&c, &url, "/admin/models/dep/load", &big).await,
        413,
        "exceeds the limit of 65536 bytes",
    );
    let response = c
        .get(format!("{url}{faults}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let response = c
        .post(format!("{url}{faults}"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let statuses = good.finish().await;
    eprintln!(
        "the well-behaved client sent {} requests meanwhile",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|&s| s == 200),
        "the well-behaved client got {:?}",
        statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
    );
    let (status, _) = get(&c, &format!("{url}/v2/health/ready")).await;
    assert_eq!(status, 200, "the server is alive");
}

/// A panic fault with count 2 kills the replica exactly twice: two restarts, then it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fault_hits_exactly_count_batches() {
    let _serial = SERIAL.lock().await;
    let url = start(&model_dir(&manifest()), |config| {
        config.admin_token = Some(TOKEN.into())
    });
    let c = client();
    let (status, answer) = admin(
        &c,
        &url,
        "/admin/models/victim/faults",
        json!({"fault": {"kind": "panic"}, "count": 2}),
    )
    .await;
    assert_eq!(
        (status, answer["count"].as_u64()),
        (200, Some(2)),
        "{answer}"
    );
    let infer = format!("{url}/v2/models/victim/infer");
    // One replica and no fallback: a batch whose worker died has nowhere to be retried.
    for _ in 0..2 {
        let (status, body) = post(&c, &infer, &mlp_request(&features(1, 1))).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("injected fault"),
            "{body}"
        );
        wait_healthy(&c, &url, "victim").await;
    }
    for i in 0..5 {
        let (status, body) = post(&c, &infer, &mlp_request(&features(i, 1))).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(router_status(&c, &url, "victim").await["restarts"], 2);
}
