//! The serverless life cycle over real HTTP: lazy load, idle unload, and live deployments
//! (blue/green, canary with promotion or automatic rollback, rollback) under concurrent load,
//! with no request failing.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "ops";

fn two_versions(v2_extra: &str) -> String {
    format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        max_batch_size = 16

        [[models]]
        name = "mlp"
        version = "2"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 16
        load = "lazy"
        {v2_extra}
        "#
    )
}

fn server(manifest: &str) -> String {
    start(&model_dir(manifest), |config| {
        config.admin_token = Some(TOKEN.into())
    })
}

async fn admin(c: &reqwest::Client, url: &str, path: &str, body: Value) -> (u16, Value) {
    common::admin_call(c, &format!("{url}{path}"), TOKEN, Some(&body)).await
}

async fn admin_get(c: &reqwest::Client, url: &str, path: &str) -> Value {
    let (status, answer) = common::admin_call(c, &format!("{url}{path}"), TOKEN, None).await;
    assert_eq!(status, 200, "GET {path}: {answer}");
    answer
}

async fn states(c: &reqwest::Client, url: &str) -> Vec<(String, String, String)> {
    let (_, list) = get(c, &format!("{url}/v2/models")).await;
    list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().into(),
                m["version"].as_str().unwrap().into(),
                m["state"].as_str().unwrap().into(),
            )
        })
        .collect()
}

async fn state_of(c: &reqwest::Client, url: &str, version: &str) -> String {
    states(c, url)
        .await
        .into_iter()
        .find(|(_, v, _)| v == version)
        .unwrap()
        .2
}

/// Clients that send requests without pause until stopped; returns every answer's status and
/// serving version.
struct Traffic {
    stop: Arc<AtomicBool>,
    /// Per client, each answer's status and version, with when its request was sent.
    tasks: Vec<tokio::task::JoinHandle<Vec<(u16, String, Instant)>>>,
}

impl Traffic {
    fn start(url: &str, clients: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|k| {
                let (stop, url, c) = (stop.clone(), format!("{url}/v2/models/mlp/infer"), client());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let (status, body) =
                            post(&c, &url, &mlp_request(&features(k as u64 * 100_000 + i, 1)))
                                .await;
                        seen.push((
                            status,
                            body["model_version"].as_str().unwrap_or("").to_string(),
                            sent,
                        ));
                        i += 1;
                    }
                    seen
                })
            })
            .collect();
        Traffic { stop, tasks }
    }

    async fn finish(self) -> Vec<(u16, String)> {
        let timed = self.finish_timed().await;
        timed.into_iter().map(|(s, v, _)| (s, v)).collect()
    }

    async fn finish_timed(self) -> Vec<(u16, String, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.unwrap());
        }
        all
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..150 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_versions_load_on_first_request_and_idle_ones_unload() {
    let url = server(&two_versions("idle_unload_secs = 1"));
    let c = client();
    assert_eq!(state_of(&c, &url, "2").await, "UNLOADED");
    assert_eq!(
        get(&c, &format!("{url}/v2/health/ready")).await.0,
        200,
        "unloaded versions do not hold readiness back"
    );
    assert_eq!(
        get(&c, &format!("{url}/v2/models/mlp/versions/2/ready"))
            .await
            .0,
        200
    );

    // Concurrent first requests all wait for the one load, then all succeed.
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let (c, url) = (c.clone(), format!("{url}/v2/models/mlp/versions/2/infer"));
            tokio::spawn(async move { post(&c, &url, &mlp_request(&features(i, 1))).await })
        })
        .collect();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model_version"], "2");
    }
    assert_eq!(state_of(&c, &url, "2").await, "READY");
    let metrics = metrics_text(&c, &url).await;
    // (Metrics are per process, and other tests here load version 2 too: check it is measured.)
    assert!(
        metrics.contains("streamserve_model_load_seconds_count{model=\"mlp\",version=\"2\"}"),
        "cold starts are measured"
    );

    // Unused for a second: scaled to zero. The next request brings it back.
    eventually("version 2 unloads when idle", async || {
        state_of(&c, &url, "2").await == "UNLOADED"
    })
    .await;
    let (status, body) = post(
        &c,
        &format!("{url}/v2/models/mlp/versions/2/infer"),
        &mlp_request(&features(1, 1)),
    )
    .await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("2")));
    // Version 1 has no idle_unload: it stays.
    assert_eq!(state_of(&c, &url, "1").await, "READY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blue_green_switches_atomically_under_load_and_rolls_back() {
    let url = server(&two_versions(""));
    let c = client();
    let traffic = Traffic::start(&url, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = admin(
        &c,
        &url,
        "/admin/models/mlp/deploy",
        json!({"version": "2", "strategy": "blue_green"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["from"].as_str(), answer["to"].as_str()),
        (Some("1"), Some("2"))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = traffic.finish().await;
    assert!(
        seen.iter().all(|(s, _)| *s == 200),
        "no request failed during the switch"
    );
    let first_v2 = seen
        .iter()
        .position(|(_, v)| v == "2")
        .expect("traffic moved to version 2");
    assert!(first_v2 > 0, "version 1 served before the switch");
    assert_eq!(
        state_of(&c, &url, "1").await,
        "UNLOADED",
        "the old version was drained and freed"
    );
    let (_, list) = get(&c, &format!("{url}/v2/models")).await;
    assert!(list["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["version"] == "2" && m["default"] == true));

    // Roll back: version 1 loads again and is the default; no request fails meanwhile.
    let traffic = Traffic::start(&url, 2);
    let (status, answer) = admin(&c, &url, "/admin/models/mlp/rollback", json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["to"], "1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = traffic.finish().await;
    assert!(seen.iter().all(|(s, _)| *s == 200));
    assert_eq!(seen.last().unwrap().1, "1");
    // The series exists at 0 from the start: the switch must have moved it.
    let metrics = metrics_text(&c, &url).await;
    let switched = sample(
        &metrics,
        "streamserve_rollout_events_total{model=\"mlp\",event=\"switched\"}",
    );
    assert!(switched.is_some_and(|n| n >= 1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_canary_is_promoted_step_by_step() {
    let url = server(&two_versions(""));
    let c = client();
    let traffic = Traffic::start(&url, 4);
    let body = json!({"version": "2", "strategy": "canary", "steps": [30, 100], "step_secs": 1});
    let (status, answer) = admin(&c, &url, "/admin/models/mlp/deploy", body).await;
    assert_eq!(status, 200, "{answer}");
    eventually("the canary is promoted", async || {
        let (_, list) = get(&c, &format!("{url}/v2/models")).await;
        list["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["version"] == "2" && m["default"] == true)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = traffic.finish().await;
    assert!(
        seen.iter().all(|(s, _)| *s == 200),
        "no request failed during the canary"
    );
    assert!(seen.iter().any(|(_, v)| v == "1") && seen.iter().any(|(_, v)| v == "2"));
    assert_eq!(seen.last().unwrap().1, "2");
    eventually("the stable version is freed", async || {
        state_of(&c, &url, "1").await == "UNLOADED"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_canary_is_rolled_back_automatically() {
    let url = server(&two_versions(""));
    let c = client();
    // Load version 2 and make it slow: every batch takes 150 ms more than it should.
    let (status, _) = admin(&c, &url, "/admin/models/mlp/load", json!({"version": "2"})).await;
    assert_eq!(status, 200);
    let fault = json!({"fault": {"kind": "slow", "ms": 150}, "version": "2", "count": 1000});
    assert_eq!(
        admin(&c, &url, "/admin/models/mlp/faults", fault).await.0,
        200
    );
    let traffic = Traffic::start(&url, 4);
    let body =
        json!({"version": "2", "strategy": "canary", "steps": [25, 50, 100], "step_secs": 1});
    let (status, answer) = admin(&c, &url, "/admin/models/mlp/deploy", body).await;
    assert_eq!(status, 200, "{answer}");
    eventually("the canary is rolled back", async || {
        let rollouts = admin_get(&c, &url, "/admin/rollouts").await;
        rollouts["last_rollback"]["mlp"].is_string()
    })
    .await;
    let rolled_back = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = traffic.finish_timed().await;
    assert!(
        seen.iter().all(|(s, _, _)| *s == 200),
        "the slow canary still answered every request"
    );
    // A request the slow canary took before the rollback may finish last; every one sent
    // after it is on the stable version.
    let after: Vec<&str> = seen
        .iter()
        .filter(|(_, _, sent)| *sent > rolled_back)
        .map(|(_, v, _)| v.as_str())
        .collect();
    assert!(!after.is_empty(), "requests were sent after the rollback");
    assert!(
        after.iter().all(|v| *v == "1"),
        "traffic is back on the stable version: {after:?}"
    );
    let rollouts = admin_get(&c, &url, "/admin/rollouts").await;
    assert!(
        rollouts["last_rollback"]["mlp"]
            .as_str()
            .unwrap()
            .contains("latency"),
        "{rollouts}"
    );
    assert_eq!(state_of(&c, &url, "2").await, "UNLOADED");
}

#[tokio::test]
async fn bad_deployments_are_refused_and_change_nothing() {
    let url = server(&two_versions(""));
    let c = client();
    let (status, body) = admin(
        &c,
        &url,
        "/admin/models/mlp/deploy",
        json!({"version": "9", "strategy": "blue_green"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = admin(
        &c,
        &url,
        "/admin/models/mlp/deploy",
        json!({"version": "2", "strategy": "rolling-ish"}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = admin(
        &c,
        &url,
        "/admin/models/mlp/deploy",
        json!({"version": "2", "strategy": "canary", "steps": [0]}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = admin(&c, &url, "/admin/models/mlp/rollback", json!({})).await;
    assert_eq!(status, 409, "nothing to roll back to: {body}");
    let (status, body) = admin(
        &c,
        &url,
        "/admin/models/mlp/unload",
        json!({"version": "1"}),
    )
    .await;
    assert_eq!((status, body["unloaded"].as_bool()), (200, Some(true)));
    let (status, _) = post(
        &c,
        &format!("{url}/v2/models/mlp/versions/1/infer"),
        &mlp_request(&features(1, 1)),
    )
    .await;
    assert_eq!(status, 200, "an unloaded version loads again on demand");
}

/// Sends two deploys of `mlp`, the second `after` the first, and returns both answers in
/// the order they were sent.
async fn two_deploys(
    c: &reqwest::Client,
    url: &str,
    first: Value,
    after: Duration,
    second: Value,
) -> [(u16, Value); 2] {
    let path = "/admin/models/mlp/deploy";
    let (first, second) = tokio::join!(admin(c, url, path, first), async {
        tokio::time::sleep(after).await;
        admin(c, url, path, second).await
    });
    [first, second]
}

/// Asserts that exactly one of two deploys was accepted and the other refused (409) because
/// the first was still being prepared.
fn one_accepted_one_refused(answers: &[(u16, Value); 2]) {
    let accepted = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(accepted, 1, "exactly one deploy is accepted: {answers:?}");
    let refused = answers.iter().find(|(s, _)| *s != 200).unwrap().clone();
    expect(refused, 409, "a deployment of 'mlp' is in progress");
}

/// After concurrent deploys: the default version of `mlp` is serving, and `mlp` answers (from
/// the default, or from a canary the accepted deploy started, both serving).
async fn default_serves(c: &reqwest::Client, url: &str) {
    let (_, list) = get(c, &format!("{url}/v2/models")).await;
    let models = list["models"].as_array().unwrap();
    let default = models
        .iter()
        .find(|m| m["name"] == "mlp" && m["default"] == true)
        .unwrap_or_else(|| panic!("mlp has a default: {list}"));
    assert_eq!(default["state"], "READY", "{list}");
    for i in 0..4 {
        let (status, body) = post(
            c,
            &format!("{url}/v2/models/mlp/infer"),
            &mlp_request(&features(i, 1)),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let version = body["model_version"].as_str().unwrap();
        assert_eq!(state_of(c, url, version).await, "READY", "{list}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_deploy_while_one_is_prepared_is_refused() {
    let url = server(&two_versions(""));
    let c = client();
    // The default's next model call takes 2 s more: the first deploy's smoke test (of the
    // version already serving) holds it, and the second comes meanwhile.
    let fault = json!({"fault": {"kind": "slow", "ms": 2000}, "count": 1});
    assert_eq!(
        admin(&c, &url, "/admin/models/mlp/faults", fault).await.0,
        200
    );
    let answers = two_deploys(
        &c,
        &url,
        json!({"version": "1", "strategy": "blue_green"}),
        Duration::from_millis(200),
        json!({"version": "2", "strategy": "blue_green"}),
    )
    .await;
    one_accepted_one_refused(&answers);
    assert_eq!(answers[0].0, 200, "the first one sent: {answers:?}");
    default_serves(&c, &url).await;

    // A blue/green switch and a canary of the same version, sent together, while version 2's
    // smoke test is slow: whichever comes first, the other is refused.
    let (status, _) = admin(&c, &url, "/admin/models/mlp/load", json!({"version": "2"})).await;
    assert_eq!(status, 200);
    let fault = json!({"fault": {"kind": "slow", "ms": 2000}, "version": "2", "count": 1});
    assert_eq!(
        admin(&c, &url, "/admin/models/mlp/faults", fault).await.0,
        200
    );
    let answers = two_deploys(
        &c,
        &url,
        json!({"version": "2", "strategy": "blue_green"}),
        Duration::ZERO,
        json!({"version": "2", "strategy": "canary", "steps": [50, 100], "step_secs": 60}),
    )
    .await;
    one_accepted_one_refused(&answers);
    default_serves(&c, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_moves_traffic_one_replica_at_a_time() {
    let url = server(&two_versions("replicas = 2"));
    let c = client();
    let traffic = Traffic::start(&url, 4);
    let (status, answer) = admin(
        &c,
        &url,
        "/admin/models/mlp/deploy",
        json!({"version": "2", "strategy": "rolling", "step_secs": 1}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["steps"],
        json!([50, 100]),
        "two replicas: half the traffic, then all"
    );
    eventually("the rolling update completes", async || {
        let (_, list) = get(&c, &format!("{url}/v2/models")).await;
        list["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["version"] == "2" && m["default"] == true)
    })
    .await;
    let seen = traffic.finish().await;
    assert!(
        seen.iter().all(|(s, _)| *s == 200),
        "no request failed during the rolling update"
    );
    assert_eq!(seen.last().unwrap().1, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_scale_up_under_pressure_within_the_cpu_budget_and_back_down() {
    let manifest = format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        replicas = 1
        max_replicas = 3
        max_batch_size = 4
        "#
    );
    // A budget of 2 threads: one replica at start, room for one more, not two.
    let url = start(&model_dir(&manifest), |config| {
        config.admin_token = Some(TOKEN.into());
        config.cpu_budget = 2;
    });
    let c = client();
    // Slow batches keep the queue deep for longer than a second.
    let fault = json!({"fault": {"kind": "slow", "ms": 100}, "count": 40});
    assert_eq!(
        admin(&c, &url, "/admin/models/mlp/faults", fault).await.0,
        200
    );
    let traffic = Traffic::start(&url, 24);
    let status = |c: reqwest::Client, url: String| async move {
        let list = admin_get(&c, &url, "/admin/models").await;
        list["models"][0]["router"].clone()
    };
    eventually("a second replica starts", async || {
        status(c.clone(), url.clone()).await["healthy_replicas"] == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status(c.clone(), url.clone()).await["replicas"],
        2,
        "the CPU budget holds the third replica back"
    );
    let seen = traffic.finish().await;
    assert!(seen.iter().all(|(s, _)| *s == 200));
    eventually("idle replicas are removed", async || {
        status(c.clone(), url.clone()).await["replicas"] == 1
    })
    .await;
}
