//! What docs/registry.md promises a new user, run as the user runs it: the quick start's
//! commands from a working directory of their own (relative registry path, the default
//! `--registry-cache`), and what an instance says when the store answers its reads but
//! refuses its report (`streamserve_registry_up`, one warning per outage, a start that does
//! not wait for the cache), and the bundled models seeded whole, keyword pipeline included.
//! Each instance is a separate `streamserve` process, so reading
//! its `/metrics` is safe here.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::child::wait_for_address;
use common::fleet::*;

const NO_ENV: &[(String, String)] = &[];

/// A `streamserve` process run from `dir`, killed when dropped.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `streamserve ARGS...` from `dir`, once it listens.
fn serve_in(dir: &Path, args: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamserve"))
        .current_dir(dir)
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--grpc-port",
            "off",
        ])
        .args(["--log-format", "json", "--http-workers", "1"])
        .args(args)
        .env_remove("STREAMSERVE_REGISTRY")
        .env_remove("STREAMSERVE_REGISTRY_CACHE")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let url = format!("http://{}", wait_for_address(&mut child));
    Served { child, url }
}

/// `streamserve registry ARGS...` from `dir`; must succeed.
fn registry_in(dir: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_streamserve"))
        .current_dir(dir)
        .arg("registry")
        .args(args)
        .env_remove("STREAMSERVE_REGISTRY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "registry {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One instance of `registry`, `id`, with no models of its own.
fn solo(id: &str, registry: &str) -> Instance {
    Instance::start(InstanceSetup {
        id,
        registry,
        models: &temp_dir("no-models"),
        cache: &temp_dir("cache"),
        env: NO_ENV,
        extra: &[],
    })
}

fn one_row() -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32",
                                   "data": vec![0.1f32; 256]}]})
}

/// docs/registry.md's quick start: a registry by a relative path and `serve` with its
/// default cache, `.streamserve-cache`, relative to the working directory. Every version
/// the instance took into that cache used to be refused ("cannot read model file
/// .streamserve-cache/…/.streamserve-cache/…"), so the instance served nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_serves_from_the_default_relative_cache() {
    let work = temp_dir("quick-start");
    let models = small_mlp_dir();
    registry_in(
        &work,
        &[
            "--registry",
            "./my-registry",
            "seed",
            "--models",
            models.to_str().unwrap(),
        ],
    );
    let served = serve_in(
        &work,
        &[
            "--registry",
            "./my-registry",
            "--models",
            "/nowhere",
            "--registry-poll-secs",
            "1",
        ],
    );
    let http = common::client();
    let response = http
        .post(format!("{}/v2/models/mlp/infer", served.url))
        .json(&one_row())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["model_version"], "1", "{answer}");
    assert!(
        work.join(".streamserve-cache").is_dir(),
        "the cache is the documented default, in the working directory"
    );
}

/// A store that answers every read but refuses this instance's report (read-only
/// credentials; here, a directory where the report's file goes): the fleet cannot see the
/// instance, so the registry is not up for it. `streamserve_registry_up` is 0 and the polls
/// count as errors, the warning is logged once (not "reachable again" and "unreachable" at
/// every poll), and the start does not stall for a minute as if the registry had not
/// answered at all. Once the report can be written, one line says it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_the_report_is_not_up_and_says_so_once() {
    let registry = seeded_registry();
    let blocked = Path::new(&registry).join("instances/refused.json");
    std::fs::create_dir_all(blocked.join("in-the-way")).unwrap();
    let started = Instant::now();
    let solo = solo("refused", &registry);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the start waited {:?}: a refused report is no reason to settle from the cache",
        started.elapsed()
    );
    let http = common::client();
    // What it read, it serves.
    let (code, _) = common::get(&http, &format!("{}/v2/models/mlp/ready", solo.url)).await;
    assert_eq!(code, 200);
    let metrics = common::metrics_text(&http, &solo.url).await;
    assert!(metrics.contains("streamserve_registry_up 0"), "{metrics}");
    let status = admin_registry(&solo.url).await;
    assert_eq!(status["reachable"], false, "{status}");
    let error = status["registry_error"].as_str().unwrap_or_default();
    assert!(error.contains("instances/refused.json"), "{status}");
    // About ten polls (0.3 s each) later: still one warning, and no flapping.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = solo.logs();
    assert_eq!(
        logs.matches("registry unreachable; serving").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("registry reachable again").count(),
        0,
        "{logs}"
    );
    let metrics = common::metrics_text(&http, &solo.url).await;
    assert!(metrics.contains("streamserve_registry_up 0"), "{metrics}");
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("streamserve_registry_polls_total{outcome=\"error\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        errors >= 5.0,
        "polls that failed count as errors: {metrics}"
    );

    // The way is clear: one line, and up again.
    std::fs::remove_dir_all(&blocked).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = common::metrics_text(&http, &solo.url).await;
        if metrics.contains("streamserve_registry_up 1") {
            break;
        }
        assert!(Instant::now() < deadline, "never up again: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let logs = solo.logs();
    assert_eq!(
        logs.matches("registry reachable again").count(),
        1,
        "{logs}"
    );
    let status = admin_registry(&solo.url).await;
    assert_eq!(status["reachable"], true, "{status}");
}

/// docs/registry.md, "On one machine": the admin API deploys a version only the registry has;
/// a version name the registry cannot hold is not in it (404, as `mlp:7` is), not a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_deploy_of_a_name_the_registry_cannot_hold_is_not_found() {
    let registry = seeded_registry();
    let solo = solo("solo", &registry);
    let http = common::client();
    for version in ["7", "../../x", ".hidden", "a b"] {
        let response = http
            .post(format!("{}/admin/models/mlp/deploy", solo.url))
            .bearer_auth("fleet-test")
            .json(&serde_json::json!({"version": version, "strategy": "blue_green"}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 404, "{version}: {body}");
        assert!(body.contains("is not in the registry"), "{version}: {body}");
    }
}

/// The README's and docs/registry.md's first step, `registry seed --models models`, on the
/// bundled directory itself: it failed at `hey_marvin` ("stream stage 'ww_melspec' is not a
/// model of this manifest", each version checked as a manifest of its own), so no keyword
/// pipeline could be served from a registry. Now every bundled model is seeded, and an
/// instance serving only the registry runs a keyword stream through the pipeline's stages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_models_seed_whole_and_the_keyword_pipeline_serves_from_the_registry() {
    let work = temp_dir("seed-bundled");
    let bundled = common::repo().join("models");
    let bundled = bundled.to_str().unwrap();
    registry_in(&work, &["--registry", "./r", "seed", "--models", bundled]);
    let served = serve_in(&work, &["--registry", "./r", "--models", "/nowhere"]);
    let (audio, rate) = common::stream_client::fixture_pcm16("keyword_positive");
    let run = common::stream_client::stream_resumable_to(
        ("hey_marvin", &serde_json::json!({"gate": false})),
        std::slice::from_ref(&served.url),
        &audio,
        rate,
        3200,
        Duration::ZERO,
        0,
    )
    .await;
    assert!(
        matches!(run.ends[..], [common::stream_client::Ended::Done]),
        "{:?}",
        run.ends
    );
    let keywords = run.results.iter().filter(|m| m["type"] == "keyword");
    assert!(
        keywords.count() > 0,
        "the phrase is spotted: {:?}",
        run.summary()
    );
}
