//! Fleet-wide deployments through a real S3-compatible server (moto's, started from the
//! project's venv): several `streamserve serve --registry s3://...` processes on 127.0.0.1,
//! driven by the `streamserve registry` commands under concurrent REST load. Blue/green
//! switches every instance once all have the new version; a slow canary is rolled back
//! fleet-wide; a rolling update moves one instance at a time; an instance killed mid-rollout
//! is not waited for and its replacement joins; the registry can go away and come back; two
//! racing deploys have one winner; a stray object whose key is no path does not stop it.
//!
//! These assert behaviour, not speed: how fast a fleet converges is measured by the load
//! suite's fleet drill (`loadgen fleet`).

mod common;

use std::time::Duration;

use common::fleet::*;

/// A registry in a fresh bucket, seeded with `mlp` 1 (the small mlp file), with versions 2
/// (the same small file, published again) and 3 (`mlp_slow`, slow on purpose) pushed.
fn seeded(s3: &S3, bucket: &str) -> (String, Vec<(String, String)>) {
    let registry = s3.registry(bucket);
    let env = s3_env(&s3.endpoint);
    let models = small_mlp_dir();
    registry_ok(
        &registry,
        &env,
        &["seed", "--models", models.to_str().unwrap()],
    );
    let repo = common::repo();
    let small = repo.join("models/mlp_small/1/model.onnx");
    let slow = repo.join("models/mlp_slow/1/model.onnx");
    for (version, file) in [("2", &small), ("3", &slow)] {
        registry_ok(
            &registry,
            &env,
            &[
                "push",
                "--name",
                "mlp",
                "--version",
                version,
                file.to_str().unwrap(),
            ],
        );
    }
    (registry, env)
}

/// `n` instances named `i0`, `i1`, ... with no models of their own: all from the registry.
fn fleet(registry: &str, env: &[(String, String)], n: usize) -> Vec<Instance> {
    let empty = temp_dir("no-models");
    (0..n)
        .map(|i| {
            Instance::start(InstanceSetup {
                id: &format!("i{i}"),
                registry,
                models: &empty,
                cache: &temp_dir("cache"),
                env,
                extra: &[],
            })
        })
        .collect()
}

fn urls(fleet: &[Instance]) -> Vec<String> {
    fleet.iter().map(|i| i.url.clone()).collect()
}

/// The `at_ms` of the last `event` of `version` in `model`'s history.
fn event_at(status: &serde_json::Value, model: &str, event: &str, version: &str) -> Option<u64> {
    desired(status, model)["history"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["event"] == event && e["version"] == version)
        .and_then(|e| e["at_ms"].as_u64())
}

/// Waits until every instance answers `mlp` with `version`.
async fn wait_serving(fleet: &[Instance], version: &str) {
    let http = common::client();
    let body = common::mlp_request(&common::features(1, 1));
    for instance in fleet {
        let url = format!("{}/v2/models/mlp/infer", instance.url);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, answer) = common::post(&http, &url, &body).await;
            if status == 200 && answer["model_version"] == version {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never served mlp:{version} (last: {status} {answer})\n{}",
                instance.id,
                instance.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_every_instance_only_once_all_have_it() {
    let s3 = S3::start();
    let (registry, env) = seeded(&s3, "blue-green");
    let fleet = fleet(&registry, &env, 3);
    wait_serving(&fleet, "1").await;
    let load = Load::start(&urls(&fleet), 6);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let out = registry_ok(
        &registry,
        &env,
        &["deploy", "mlp", "2", "--strategy", "blue_green"],
    );
    assert!(out.contains("blue_green rollout of 2 from 1"), "{out}");
    let switched_at = wait_for("the switch", Duration::from_secs(60), || {
        event_at(&status(&registry, &env), "mlp", "switched", "2")
    });
    wait_serving(&fleet, "2").await;
    let all_on_2 = now_ms();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answers = load.finish().await;

    assert_all_ok(&answers);
    // Nobody served the new version before the switch was recorded...
    let early: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.version == "2" && a.received_ms < switched_at)
        .collect();
    assert!(
        early.is_empty(),
        "served 2 before the switch at {switched_at}: {early:?}"
    );
    // ...and everybody serves it after.
    let late: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.version != "2" && a.sent_ms > all_on_2)
        .collect();
    assert!(
        late.is_empty(),
        "still served 1 after all switched: {late:?}"
    );
    for instance in 0..fleet.len() {
        assert!(answers
            .iter()
            .any(|a| a.instance == instance && a.version == "1"));
        assert!(answers
            .iter()
            .any(|a| a.instance == instance && a.version == "2"));
    }
    let status = status(&registry, &env);
    assert_eq!(desired(&status, "mlp")["default"], "2");
    assert!(desired(&status, "mlp")["rollout"].is_null());
    // Every instance reported, and reports serving 2 alone (1 was unloaded).
    let reports = status["instances"].as_array().unwrap();
    assert_eq!(reports.len(), 3, "{status}");
    for report in reports {
        let mlp = &report["models"]["mlp"];
        assert_eq!(mlp["default"], "2", "{report}");
        assert_ne!(mlp["versions"]["1"]["state"], "READY", "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_canary_is_rolled_back_on_every_instance() {
    let s3 = S3::start();
    let (registry, env) = seeded(&s3, "canary");
    let fleet = fleet(&registry, &env, 3);
    wait_serving(&fleet, "1").await;
    let load = Load::start(&urls(&fleet), 9);
    registry_ok(
        &registry,
        &env,
        &[
            "deploy",
            "mlp",
            "3",
            "--strategy",
            "canary",
            "--steps",
            "50,90,100",
            "--step-secs",
            "5",
        ],
    );
    let reason = wait_for("the rollback", Duration::from_secs(60), || {
        let status = status(&registry, &env);
        let history = desired(&status, "mlp")["history"].as_array()?.clone();
        let last = history.last()?;
        (last["event"] == "rolled_back").then(|| last["reason"].as_str().unwrap().to_string())
    });
    // Every instance stops sending the canary traffic within a poll or two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = now_ms();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answers = load.finish().await;

    assert!(reason.contains("canary worse than stable"), "{reason}");
    // Judged while the stable version still had traffic to compare with (a step before 100%;
    // the first, unless the canary loaded too late in it to get 5 requests).
    assert!(
        reason.contains("step 1 (50%)") || reason.contains("step 2 (90%)"),
        "{reason}"
    );
    assert_all_ok(&answers);
    assert!(
        answers.iter().any(|a| a.version == "3"),
        "the canary took traffic"
    );
    let after: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent_ms > stopped && a.version != "1")
        .collect();
    assert!(
        after.is_empty(),
        "the canary still served after the rollback: {after:?}"
    );
    let status = status(&registry, &env);
    assert_eq!(desired(&status, "mlp")["default"], "1");
    for report in status["instances"].as_array().unwrap() {
        assert!(report["models"]["mlp"]["canary"].is_null(), "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_moves_one_instance_at_a_time() {
    let s3 = S3::start();
    let (registry, env) = seeded(&s3, "rolling");
    let fleet = fleet(&registry, &env, 3);
    wait_serving(&fleet, "1").await;
    let load = Load::start(&urls(&fleet), 6);
    registry_ok(
        &registry,
        &env,
        &[
            "deploy",
            "mlp",
            "2",
            "--strategy",
            "rolling",
            "--hold-secs",
            "2",
        ],
    );
    // Watch which instances serve 2 as the default, from their reports.
    let mut seen: Vec<usize> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let status = status(&registry, &env);
        let on_new = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["models"]["mlp"]["default"] == "2")
            .count();
        if seen.last() != Some(&on_new) {
            seen.push(on_new);
        }
        if desired(&status, "mlp")["default"] == "2" && on_new == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never rolled out: {seen:?}\n{status}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let answers = load.finish().await;
    assert_all_ok(&answers);
    // 0, 1, 2, 3 instances on the new version, one step at a time (each after a 2 s hold).
    assert_eq!(seen, vec![0, 1, 2, 3], "instances on 2, as they changed");
    let status = status(&registry, &env);
    assert_eq!(
        events(&status, "mlp").last().unwrap(),
        &("rolled_out".to_string(), "2".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_not_waited_for_and_a_new_one_joins_the_rollout() {
    let s3 = S3::start();
    let (registry, env) = seeded(&s3, "rejoin");
    let mut fleet = fleet(&registry, &env, 2);
    wait_serving(&fleet, "1").await;
    registry_ok(
        &registry,
        &env,
        &[
            "deploy",
            "mlp",
            "2",
            "--strategy",
            "canary",
            "--steps",
            "50,100",
            "--step-secs",
            "3",
        ],
    );
    // Mid-rollout: one instance dies without a word; another starts and joins.
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.pop().unwrap().kill();
    let joined = Instance::start(InstanceSetup {
        id: "i9",
        registry: &registry,
        models: &temp_dir("no-models"),
        cache: &temp_dir("cache"),
        env: &env,
        extra: &[],
    });
    fleet.push(joined);
    let load = Load::start(&urls(&fleet), 4);
    wait_for("the promotion", Duration::from_secs(60), || {
        event_at(&status(&registry, &env), "mlp", "promoted", "2")
    });
    wait_serving(&fleet, "2").await;
    let answers = load.finish().await;
    assert_all_ok(&answers);
    // The newcomer took part: it served the canary before the promotion was recorded.
    let status = status(&registry, &env);
    let promoted = event_at(&status, "mlp", "promoted", "2").unwrap();
    assert!(
        answers
            .iter()
            .any(|a| a.instance == 1 && a.version == "2" && a.received_ms < promoted),
        "the joined instance served no canary traffic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_is_survived_and_caught_up_with() {
    let s3 = S3::start();
    let (registry, env) = seeded(&s3, "unreachable");
    // The instances reach the store through a gate that the test can close.
    let gate = Gate::new(&s3.endpoint);
    let gated_env = s3_env(&gate.addr);
    let cache = temp_dir("cache");
    let empty = temp_dir("no-models");
    let setup = |id| InstanceSetup {
        id,
        registry: &registry,
        models: &empty,
        cache: &cache,
        env: &gated_env,
        extra: &["--registry-wait-secs", "5"],
    };
    let a = Instance::start(setup("a"));
    wait_serving(std::slice::from_ref(&a), "1").await;

    // Mid-run: the store goes away; the instance keeps serving and says so.
    gate.close();
    let http = common::client();
    let down = loop {
        let status = admin_registry(&a.url).await;
        if status["reachable"] == false {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        down["registry_error"]
            .as_str()
            .unwrap()
            .contains("registry unreachable"),
        "{down}"
    );
    let metrics = common::metrics_text(&http, &a.url).await;
    assert!(metrics.contains("streamserve_registry_up 0"), "{metrics}");
    let load = Load::start(std::slice::from_ref(&a.url), 2);
    // Meanwhile an operator deploys 2 (straight to the store, not through the gate).
    registry_ok(&registry, &env, &["deploy", "mlp", "2"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answers = load.finish().await;
    assert_all_ok(&answers);
    assert!(
        answers.iter().all(|a| a.version == "1"),
        "it cannot know of 2 yet"
    );

    // One warning when it went, however many polls failed since (their texts differ).
    let warnings = a.logs().matches("registry unreachable; serving").count();
    assert_eq!(warnings, 1, "{}", a.logs());

    // A restart while the store is away serves what the cache kept; a new instance with an
    // empty cache starts too, with nothing to serve.
    a.stop();
    let a = Instance::start(setup("a"));
    wait_serving(std::slice::from_ref(&a), "1").await;
    let fresh = Instance::start(InstanceSetup {
        id: "b",
        cache: &temp_dir("cache"),
        ..setup("b")
    });
    let (code, _) = common::get(&http, &format!("{}/v2/models/mlp", fresh.url)).await;
    assert_eq!(code, 404);

    // The store is back: both catch up with the deployment.
    gate.reopen();
    let (a, fresh) = (&a, &fresh);
    for instance in [a, fresh] {
        wait_serving(std::slice::from_ref(instance), "2").await;
    }
    // Whatever went wrong, no credential reached a log line or the metrics.
    let metrics = common::metrics_text(&http, &fresh.url).await;
    for (name, value) in &gated_env {
        if name.contains("KEY") {
            assert!(!fresh.logs().contains(value.as_str()), "{name} in the logs");
            assert!(!a.logs().contains(value.as_str()), "{name} in the logs");
            assert!(!metrics.contains(value.as_str()), "{name} in the metrics");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_racing_deploys_exactly_one_wins() {
    let s3 = S3::start();
    let (registry, env) = seeded(&s3, "racing");
    let outputs: Vec<std::process::Output> = std::thread::scope(|scope| {
        let runs: Vec<_> = ["2", "3", "2", "3", "2"]
            .into_iter()
            .map(|version| {
                let (registry, env) = (&registry, &env);
                scope.spawn(move || {
                    registry_cli(
                        registry,
                        env,
                        &["deploy", "mlp", version, "--strategy", "canary"],
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let won: Vec<_> = outputs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(won.len(), 1, "{outputs:?}");
    for lost in outputs.iter().filter(|o| !o.status.success()) {
        let stderr = String::from_utf8_lossy(&lost.stderr);
        assert!(
            stderr.contains("rollout of mlp:") && stderr.contains("is running"),
            "{stderr}"
        );
    }
    let status = status(&registry, &env);
    let deploys = events(&status, "mlp")
        .iter()
        .filter(|(event, _)| event == "deploy")
        .count();
    assert_eq!(deploys, 1, "one rollout recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_key_in_the_store_does_not_stop_the_fleet() {
    let s3 = S3::start();
    let (registry, env) = seeded(&s3, "stray");
    let fleet = fleet(&registry, &env, 1);
    wait_serving(&fleet, "1").await;
    // `aws s3 cp notes.txt s3://stray/registry/models//notes.txt`: a key with an empty
    // segment, which fails a whole listing of models/.
    put_object(&s3.endpoint, "stray", "registry/models//notes.txt", b"x");
    for command in ["list", "status"] {
        let out = registry_cli(&registry, &env, &[command]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{command}: {stdout}{stderr}");
        assert!(stdout.contains("mlp: default 1"), "{command}: {stdout}");
        assert!(
            stderr.contains("bad key in registry") && stderr.contains("models//"),
            "{command}: {stderr}"
        );
    }
    // The instance still follows the models it knows.
    registry_ok(
        &registry,
        &env,
        &[
            "deploy",
            "mlp",
            "2",
            "--strategy",
            "blue_green",
            "--no-smoke-test",
        ],
    );
    wait_serving(&fleet, "2").await;
    let account = admin_registry(&fleet[0].url).await;
    assert_eq!(account["reachable"], true, "{account}");
    let error = account["registry_error"].as_str().unwrap_or_default();
    assert!(error.contains("bad key in registry"), "{account}");
    assert!(!error.contains("unreachable"), "{account}");
    // Under instances/ too: status shows the models, and says why it shows no instance.
    put_object(&s3.endpoint, "stray", "registry/instances//notes.txt", b"x");
    let out = registry_cli(&registry, &env, &["status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("instances//"), "{stderr}");
    let logs = fleet[0].logs();
    assert!(!logs.contains("registry unreachable"), "{logs}");
}
