//! The model registry on a local directory (`file://` or a path, for one machine), through the
//! `streamserve registry` commands and `serve --registry`: what `push` records and refuses,
//! clear errors for bad input, a corrupt or mismatched model file that is never served (and
//! the reason reported), an admin deployment of a version that only the registry has, and
//! racing deploys on a local directory (its compare-and-swap is a file lock).

use crate::common;

use std::time::Duration;

use common::fleet::*;
use serde_json::Value;

const NO_ENV: &[(String, String)] = &[];

fn small() -> String {
    common::repo()
        .join("models/mlp_small/1/model.onnx")
        .display()
        .to_string()
}

fn failure(registry: &str, args: &[&str]) -> String {
    let out = registry_cli(registry, NO_ENV, args);
    assert!(
        !out.status.success(),
        "{args:?} should fail, printed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn push_records_the_version_and_refuses_to_overwrite_it() {
    let registry = format!("file://{}", temp_dir("registry").display());
    let config = temp_dir("config").join("model.toml");
    std::fs::write(&config, "replicas = 2\nmax_batch_size = 8\nslo_ms = 40\n").unwrap();
    let out = registry_ok(
        &registry,
        NO_ENV,
        &[
            "push",
            "--name",
            "m",
            "--version",
            "1",
            &small(),
            "--config",
            config.to_str().unwrap(),
            "--description",
            "a small classifier",
            "--source",
            "run 42",
        ],
    );
    assert!(
        out.contains(&format!(
            "pushed m:1 (35429 bytes, sha256 {})",
            common::MLP_SMALL_SHA
        )),
        "{out}"
    );
    let list: Value =
        serde_json::from_str(&registry_ok(&registry, NO_ENV, &["list", "--json"])).unwrap();
    let record = &list[0]["versions"][0];
    assert_eq!(record["sha256"], common::MLP_SMALL_SHA);
    assert_eq!(record["size"], 35429);
    assert_eq!(record["settings"]["replicas"], 2);
    assert_eq!(record["settings"]["max_batch_size"], 8);
    assert_eq!(record["description"], "a small classifier");
    assert_eq!(record["source"], "run 42");
    assert!(
        record["pushed_by"].as_str().unwrap().contains('@'),
        "{record}"
    );
    assert!(record["pushed_at_ms"].as_u64().unwrap() > 0);
    let input = &record["interface"]["inputs"][0];
    assert_eq!(
        (&input["name"], &input["datatype"]),
        (&"features".into(), &"FP32".into())
    );
    assert_eq!(input["shape"], serde_json::json!([-1, 256]));
    assert!(list[0]["desired"].is_null(), "pushed, not deployed");

    let stderr = failure(
        &registry,
        &["push", "--name", "m", "--version", "1", &small()],
    );
    assert!(
        stderr.contains("m:1 is already in the registry; versions are immutable"),
        "{stderr}"
    );
    // The first push is intact.
    let text = registry_ok(&registry, NO_ENV, &["list"]);
    assert!(text.contains("a small classifier"), "{text}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let registry = seeded_registry();
    let dir = temp_dir("bad");
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "replicaz = 2\n").unwrap();
    let identity = dir.join("identity.toml");
    std::fs::write(&identity, "name = \"other\"\n").unwrap();
    let not_onnx = dir.join("model.onnx");
    std::fs::write(&not_onnx, "not a model").unwrap();
    let (typo, identity, not_onnx) = (
        typo.to_str().unwrap(),
        identity.to_str().unwrap(),
        not_onnx.to_str().unwrap(),
    );
    let small = small();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["push", "--name", "../x", "--version", "1", &small],
            "model name '../x' must be 1-64 letters",
        ),
        (
            vec!["push", "--name", "m", "--version", "", &small],
            "version '' must be 1-64 letters",
        ),
        (
            vec![
                "push",
                "--name",
                "m",
                "--version",
                "1",
                &small,
                "--config",
                typo,
            ],
            "unknown field `replicaz`",
        ),
        (
            vec![
                "push",
                "--name",
                "m",
                "--version",
                "1",
                &small,
                "--config",
                identity,
            ],
            "may not set 'name'",
        ),
        (
            vec!["push", "--name", "m", "--version", "1", not_onnx],
            "cannot open",
        ),
        (
            vec![
                "push",
                "--name",
                "m",
                "--version",
                "1",
                "/nonexistent/model.onnx",
            ],
            "/nonexistent/model.onnx",
        ),
        (vec!["deploy", "mlp", "9"], "mlp:9 is not in the registry"),
        (
            vec!["deploy", "nosuch", "1"],
            "nosuch:1 is not in the registry",
        ),
        (vec!["deploy", "mlp", "1"], "mlp:1 is already the default"),
        (
            vec!["rollback", "mlp"],
            "did not replace another version by a deployment",
        ),
        (
            vec!["rollback", "nosuch"],
            "a desired state of 'nosuch' is not in the registry",
        ),
        (
            vec!["rollback", "mlp", "--to", "7"],
            "mlp:7 is not in the registry",
        ),
    ];
    for (args, want) in cases {
        let stderr = failure(&registry, &args);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    // A misspelt registry directory is named, not created and listed as "(no models)".
    let misspelt = temp_dir("misspelt").join("regsitry");
    for args in [&["list"][..], &["status"], &["deploy", "mlp", "1"]] {
        let stderr = failure(misspelt.to_str().unwrap(), args);
        assert!(
            stderr.contains("regsitry does not exist (`push` or `seed` creates it)"),
            "{args:?}: {stderr}"
        );
    }
    assert!(
        !misspelt.exists(),
        "a reading command created the directory"
    );
    registry_ok(
        &registry,
        NO_ENV,
        &["push", "--name", "mlp", "--version", "2", &small],
    );
    let stderr = failure(
        &registry,
        &[
            "deploy",
            "mlp",
            "2",
            "--strategy",
            "canary",
            "--steps",
            "50,40,100",
        ],
    );
    assert!(stderr.contains("strictly increasing"), "{stderr}");

    // Without a registry, or with one the server cannot speak to.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_streamserve"))
        .args(["registry", "list"])
        .env_remove("STREAMSERVE_REGISTRY")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("which registry?"));
    let stderr = failure("ftp://host/models", &["list"]);
    assert!(
        stderr.contains("scheme 'ftp:' is not supported"),
        "{stderr}"
    );
    // A broken record is listed as broken, not as a failure of the whole listing.
    let version_dir = std::path::Path::new(&registry).join("models/mlp/5");
    std::fs::create_dir_all(&version_dir).unwrap();
    std::fs::write(version_dir.join("version.json"), "{ not json").unwrap();
    let text = registry_ok(&registry, NO_ENV, &["list"]);
    assert!(
        text.contains("5          BROKEN: models/mlp/5/version.json: not a valid document"),
        "{text}"
    );
}

fn instance(registry: &str, models: &std::path::Path) -> Instance {
    Instance::start(InstanceSetup {
        id: "solo",
        registry,
        models,
        cache: &temp_dir("cache"),
        env: NO_ENV,
        extra: &[],
    })
}

/// The reason `solo` reports for `mlp:version` being unavailable, once it does.
fn unavailable_reason(registry: &str, version: &str) -> String {
    wait_for("the failure report", Duration::from_secs(30), || {
        let status = status(registry, NO_ENV);
        let report = status["instances"].as_array()?.first()?.clone();
        report["models"]["mlp"]["unavailable"][version]
            .as_str()
            .map(str::to_string)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_mismatched_file_is_never_served_and_says_why() {
    let registry = seeded_registry();
    let small = small();
    for version in ["2", "3"] {
        registry_ok(
            &registry,
            NO_ENV,
            &["push", "--name", "mlp", "--version", version, &small],
        );
    }
    // 2: same size, other bytes (a replaced object); 3: cut short (a partial upload).
    let object = |v: &str| {
        std::path::Path::new(&registry)
            .join(format!("models/mlp/{v}/{}.onnx", common::MLP_SMALL_SHA))
    };
    let size = std::fs::metadata(object("2")).unwrap().len() as usize;
    std::fs::write(object("2"), vec![7u8; size]).unwrap();
    std::fs::write(object("3"), b"truncated").unwrap();

    let solo = instance(&registry, &temp_dir("no-models"));
    let load = Load::start(std::slice::from_ref(&solo.url), 2);
    registry_ok(&registry, NO_ENV, &["deploy", "mlp", "2"]);
    let reason = unavailable_reason(&registry, "2");
    assert!(
        reason.contains("sha256") && reason.contains("not served"),
        "{reason}"
    );
    // The blue/green rollout is blocked, and says by whom and why.
    let text = registry_ok(&registry, NO_ENV, &["status"]);
    assert!(
        text.contains("solo: FAILED:") && text.contains("sha256"),
        "{text}"
    );
    assert!(text.contains("mlp:2 unavailable:"), "{text}");
    registry_ok(&registry, NO_ENV, &["rollback", "mlp"]);

    registry_ok(&registry, NO_ENV, &["deploy", "mlp", "3"]);
    let reason = unavailable_reason(&registry, "3");
    assert!(reason.contains("the model file is 9 bytes"), "{reason}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answers = load.finish().await;
    assert_all_ok(&answers);
    assert!(
        answers.iter().all(|a| a.version == "1"),
        "only the good version served"
    );
    // Nothing partial is left in the cache.
    let logs = solo.logs();
    assert!(
        logs.contains("cannot take the version from the registry"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_deployment_takes_a_version_only_the_registry_has() {
    let registry = seeded_registry();
    registry_ok(
        &registry,
        NO_ENV,
        &["push", "--name", "mlp", "--version", "5", &small()],
    );
    // This instance has its own copy of mlp:1 (a model directory), and follows the registry.
    let solo = instance(&registry, &small_mlp_dir());
    let http = common::client();
    let admin = |path: &str| format!("{}/admin/{path}", solo.url);
    let deploy = |version: &str| {
        http.post(admin("models/mlp/deploy"))
            .bearer_auth("fleet-test")
            .json(&serde_json::json!({"version": version, "strategy": "blue_green"}))
            .send()
    };
    let response = deploy("5").await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let (code, answer) = common::post(
        &http,
        &format!("{}/v2/models/mlp/infer", solo.url),
        &common::mlp_request(&common::features(3, 1)),
    )
    .await;
    assert_eq!((code, answer["model_version"].as_str()), (200, Some("5")));
    let response = deploy("6").await.unwrap();
    assert_eq!(response.status(), 404);
    let text = response.text().await.unwrap();
    assert!(text.contains("mlp:6 is not in the registry"), "{text}");

    let account = admin_registry(&solo.url).await;
    assert_eq!(account["instance"], "solo");
    assert_eq!(account["reachable"], true);
    assert_eq!(account["models"]["mlp"]["desired"]["default"], "1");
    // The registry's desired state did not change: the admin API acts on one machine.
    let desired_state = status(&registry, NO_ENV);
    assert_eq!(desired(&desired_state, "mlp")["default"], "1");
}

#[test]
fn racing_deploys_on_a_local_directory_have_one_winner() {
    let registry = seeded_registry();
    for version in ["2", "3"] {
        registry_ok(
            &registry,
            NO_ENV,
            &["push", "--name", "mlp", "--version", version, &small()],
        );
    }
    let outputs: Vec<std::process::Output> = std::thread::scope(|scope| {
        let runs: Vec<_> = ["2", "3", "2", "3"]
            .into_iter()
            .map(|v| {
                let registry = &registry;
                scope.spawn(move || registry_cli(registry, NO_ENV, &["deploy", "mlp", v]))
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(
        outputs.iter().filter(|o| o.status.success()).count(),
        1,
        "{outputs:?}"
    );
}

/// A probe made by `streamserve profile --probe` on the real mlp, in a model directory of its
/// own (the command writes beside the model file): its golden answer is the real mlp's.
fn mlp_probe() -> std::path::PathBuf {
    let dir = temp_dir("probe-models");
    std::fs::create_dir_all(dir.join("mlp")).unwrap();
    std::fs::copy(
        common::repo().join("models/mlp/1/model.onnx"),
        dir.join("mlp/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        dir.join("models.toml"),
        format!(
            "[[models]]\nname = \"mlp\"\nversion = \"1\"\nfile = \"mlp/model.onnx\"\nsha256 = \"{}\"\n",
            common::MLP_SHA
        ),
    )
    .unwrap();
    let data = dir.join("data.jsonl");
    std::fs::write(
        &data,
        common::mlp_request(&common::features(11, 2)).to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_streamserve"))
        .current_dir(common::repo())
        .args(["profile", "mlp", "--probe", "--models"])
        .arg(&dir)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("mlp/probe.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_published_with_a_version_travels_with_it_and_stops_a_wrong_one() {
    let registry = seeded_registry();
    // Version 7 is the small mlp's file with the real mlp's probe beside it: a wrong version.
    let dir = temp_dir("wrong");
    let file = dir.join("model.onnx");
    std::fs::copy(small(), &file).unwrap();
    std::fs::copy(mlp_probe(), dir.join("probe.json")).unwrap();
    // A profile made for other weights is refused at the push, not at the deployment.
    std::fs::write(
        dir.join("profile.json"),
        r#"{"format": 1, "model_sha256": "00", "rows": 1, "created_unix": 0, "outputs": {}}"#,
    )
    .unwrap();
    let stderr = failure(
        &registry,
        &[
            "push",
            "--name",
            "mlp",
            "--version",
            "7",
            file.to_str().unwrap(),
        ],
    );
    assert!(stderr.contains("not this one"), "{stderr}");
    std::fs::remove_file(dir.join("profile.json")).unwrap();
    registry_ok(
        &registry,
        NO_ENV,
        &[
            "push",
            "--name",
            "mlp",
            "--version",
            "7",
            file.to_str().unwrap(),
        ],
    );
    let list: Value =
        serde_json::from_str(&registry_ok(&registry, NO_ENV, &["list", "--json"])).unwrap();
    let record = list[0]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == "7")
        .unwrap();
    assert_eq!(record["probe"]["outputs"][0]["name"], "logits", "{record}");

    let solo = instance(&registry, &small_mlp_dir());
    let http = common::client();
    let response = http
        .post(format!("{}/admin/models/mlp/deploy", solo.url))
        .bearer_auth("fleet-test")
        .json(&serde_json::json!({"version": "7", "strategy": "blue_green"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let text = response.text().await.unwrap();
    assert!(text.contains("probe fails"), "{text}");
}
