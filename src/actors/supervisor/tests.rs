//! Unit tests of the supervisor as an actor, on test-double sessions (an FP32 `x [-1, 4]` ->
//! `y [-1, 4]` echo; no ONNX Runtime, no real model): what it publishes to the catalog when it
//! starts, loads, unloads and deploys, and what it answers. Each test writes its own model
//! directory (a small file with its sha256, and a manifest) and runs in milliseconds, except
//! those that wait for the supervisor's tick (idle unload, canary steps: a second or two).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};

use super::*;
use crate::actors::served::{InferOptions, Sent};
use crate::manifest::sha256_file;
use crate::runtime::doubles::{Behaviour, DoubleLoader};
use crate::tensor::{NamedTensor, TensorData};

/// `m:1` (eager) and `m:2` (lazy, two replicas) for deployments; `idle:1`, lazy, unloaded after
/// a second without requests; `bad:1`, whose file does not have the sha256 the manifest says.
const MANIFEST: &str = r#"
[[models]]
name = "m"
version = "1"
file = "model.onnx"
sha256 = "{sha}"
max_batch_size = 4

[[models]]
name = "m"
version = "2"
file = "model.onnx"
sha256 = "{sha}"
max_batch_size = 4
replicas = 2
load = "lazy"

[[models]]
name = "idle"
version = "1"
file = "model.onnx"
sha256 = "{sha}"
load = "lazy"
idle_unload_secs = 1

[[models]]
name = "bad"
version = "1"
file = "model.onnx"
sha256 = "{wrong}"
"#;

struct Fixture {
    loader: &'static DoubleLoader,
    catalog: Arc<SharedCatalog>,
    supervisor: Addr<Supervisor>,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A supervisor of [`MANIFEST`] on echo doubles, with `ram_mb` of memory budget, started.
async fn start(test: &str, ram_mb: u64) -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "streamserve-supervisor-{test}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file: PathBuf = dir.join("model.onnx");
    std::fs::write(&file, b"not a real model: the doubles never read it").unwrap();
    let text = MANIFEST
        .replace("{sha}", &sha256_file(&file).unwrap())
        .replace("{wrong}", &"0".repeat(64));
    let manifest = Manifest::parse(&dir, &text).unwrap();
    let loader = DoubleLoader::new(Behaviour::Echo).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let budgets = Arc::new(Budgets::new(8, ram_mb, 0));
    let supervisor = Supervisor::new(loader, catalog.clone(), budgets).start();
    supervisor.send(Start(manifest)).await.unwrap();
    Fixture {
        loader,
        catalog,
        supervisor,
        dir,
    }
}

impl Fixture {
    fn label(&self, name: &str, version: &str) -> &'static str {
        self.catalog.snapshot().models[name].versions[version].label()
    }

    fn default_of(&self, name: &str) -> String {
        let catalog = self.catalog.snapshot();
        catalog.models[name].default_version().unwrap().to_string()
    }

    fn served(&self, name: &str, version: &str) -> ServedModel {
        self.catalog
            .snapshot()
            .resolve(name, Some(version))
            .unwrap()
    }

    async fn ensure(&self, name: &str, version: Option<&str>) -> Result<ServedModel, ServeError> {
        self.supervisor
            .send(EnsureLoaded {
                name: name.into(),
                version: version.map(str::to_string),
            })
            .await
            .unwrap()
    }

    async fn deploy(
        &self,
        version: &str,
        strategy: Strategy,
    ) -> Result<serde_json::Value, ServeError> {
        self.deploy_in_steps(version, strategy, 60).await
    }

    async fn deploy_in_steps(
        &self,
        version: &str,
        strategy: Strategy,
        step_secs: u64,
    ) -> Result<serde_json::Value, ServeError> {
        self.supervisor
            .send(Deploy {
                name: "m".into(),
                version: version.into(),
                strategy,
                steps: vec![50, 100],
                step_secs,
                smoke_test: true,
            })
            .await
            .unwrap()
    }

    async fn rollback(&self) -> Result<serde_json::Value, ServeError> {
        self.supervisor
            .send(Rollback { name: "m".into() })
            .await
            .unwrap()
    }

    async fn rollouts(&self) -> serde_json::Value {
        self.supervisor.send(Rollouts).await.unwrap()
    }
}

/// `[1, 2, 3, 4]`, validated for `served`.
fn one_row(served: &ServedModel) -> Result<crate::model::InferRequest, ServeError> {
    let x = NamedTensor {
        name: "x".into(),
        shape: vec![1, 4],
        data: TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0]),
    };
    served.info.validate(vec![x], None)
}

/// Runs `[1, 2, 3, 4]` through `served` and returns what came back.
async fn echo(served: &ServedModel) -> Result<Vec<f32>, ServeError> {
    let request = one_row(served)?;
    let response = served.infer(request, InferOptions::now()).await?;
    match &response.outputs[0].data {
        TensorData::Fp32(y) => Ok(y.clone()),
        other => panic!("expected FP32, got {other:?}"),
    }
}

/// Waits (up to 10 s) for `done`, checking every 20 ms while the supervisor's tick runs.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

#[actix::test]
async fn start_serves_eager_versions_and_lists_the_rest() {
    let f = start("start", 1024).await;
    assert_eq!(f.label("m", "1"), "READY");
    assert_eq!(f.label("m", "2"), "UNLOADED");
    assert_eq!(f.label("idle", "1"), "UNLOADED");
    // The manifest's default is the highest eager version, lazy ones wait for a deployment.
    assert_eq!(f.default_of("m"), "1");
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(served.info.version, "1");
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // A file that is not what the manifest says is refused, with the reason; it stays so.
    assert_eq!(f.label("bad", "1"), "UNAVAILABLE");
    match f.ensure("bad", None).await {
        Err(ServeError::ModelUnavailable { reason, .. }) => {
            assert!(reason.contains("sha256 mismatch"), "{reason}")
        }
        other => panic!("expected unavailable, got {:?}", other.map(|_| ())),
    }
}

#[actix::test]
async fn a_lazy_version_loads_on_its_first_request() {
    let f = start("lazy", 1024).await;
    let served = f.ensure("m", Some("2")).await.unwrap();
    assert_eq!(served.info.version, "2");
    assert_eq!(served.info.replicas, 2);
    assert_eq!(f.label("m", "2"), "READY");
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // Loading does not make it the default.
    assert_eq!(f.default_of("m"), "1");
    assert!(matches!(
        f.ensure("m", Some("9")).await,
        Err(ServeError::VersionNotFound { .. })
    ));
    assert!(matches!(
        f.ensure("nope", None).await,
        Err(ServeError::ModelNotFound(_))
    ));
}

#[actix::test]
async fn an_idle_version_unloads_and_loads_again_on_demand() {
    let f = start("idle", 1024).await;
    f.ensure("idle", None).await.unwrap();
    assert_eq!(f.label("idle", "1"), "READY");
    eventually("idle:1 is unloaded", || f.label("idle", "1") == "UNLOADED").await;
    // Versions without idle_unload_secs stay.
    assert_eq!(f.label("m", "1"), "READY");
    let served = f.ensure("idle", None).await.unwrap();
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

/// The catalog's own handle of a serving version, as a request takes it in the instant of an
/// unload: it does not hold the version.
fn unheld(f: &Fixture, name: &str, version: &str) -> ServedModel {
    match &f.catalog.snapshot().models[name].versions[version] {
        VersionState::Serving(served) => served.clone(),
        _ => panic!("{name}:{version} is not serving"),
    }
}

/// Waits until the version's router has stopped (drained after an unload).
async fn stopped(served: &ServedModel) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.status().await.is_some() {
        assert!(Instant::now() < deadline, "the router did not stop");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

#[actix::test]
async fn a_held_version_is_not_unloaded_idle_and_a_request_it_stopped_under_loads_it_again() {
    let f = start("idle-held", 1024).await;
    // Held, as by a request whose body is still arriving or a silent stream: it stays loaded
    // well past its second of idleness, and serves.
    let held = f.ensure("idle", None).await.unwrap();
    assert_eq!(held.holders(), 1);
    actix::clock::sleep(Duration::from_millis(1600)).await;
    assert_eq!(f.label("idle", "1"), "READY");
    assert_eq!(echo(&held).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // Once nobody holds it, it unloads.
    let stale = unheld(&f, "idle", "1");
    drop(held);
    assert_eq!(stale.holders(), 0);
    eventually("idle:1 unloads once free", || {
        f.label("idle", "1") == "UNLOADED"
    })
    .await;
    stopped(&stale).await;
    // A request that still reaches the stopped router is not lost: the version loads again
    // and answers it, once.
    let calls = f.loader.calls().len();
    assert_eq!(echo(&stale).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(f.loader.calls().len(), calls + 1, "run exactly once");
    assert_eq!(f.label("idle", "1"), "READY");
    // The stale handle now leads to the new version (and holds it), with no second load.
    let reloaded = unheld(&f, "idle", "1");
    assert_eq!(reloaded.holders(), 1);
    assert_eq!(echo(&stale).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(f.label("idle", "1"), "READY");
    drop(stale);
    assert_eq!(reloaded.holders(), 0);
    eventually("idle:1 unloads again", || {
        f.label("idle", "1") == "UNLOADED"
    })
    .await;
}

#[actix::test]
async fn a_request_taken_to_the_version_loaded_again_says_which_answered_it() {
    // What counts the answer (the version's health, its series) must be the version that
    // answered, not the stopped one the request was resolved to.
    let f = start("idle-counted", 1024).await;
    f.ensure("idle", None).await.unwrap();
    let stale = unheld(&f, "idle", "1");
    eventually("idle:1 unloads", || f.label("idle", "1") == "UNLOADED").await;
    stopped(&stale).await;
    let request = Arc::new(one_row(&stale).unwrap());
    let Sent::Answered { answer, by } = stale.send(request.clone(), InferOptions::now()).await
    else {
        panic!("an idle unload is not a retirement");
    };
    assert!(answer.is_ok());
    let reloaded = unheld(&f, "idle", "1");
    let by = by.expect("another version answered");
    assert!(
        Arc::ptr_eq(&by.health, &reloaded.health),
        "the reloaded one"
    );
    assert!(!Arc::ptr_eq(&by.health, &stale.health));
    // Straight to it the next time, and said so again.
    let Sent::Answered { by, .. } = stale.send(request, InferOptions::now()).await else {
        panic!("served");
    };
    assert!(Arc::ptr_eq(&by.unwrap().health, &reloaded.health));
    // A handle whose own router serves names none.
    let request = Arc::new(one_row(&reloaded).unwrap());
    let Sent::Answered { by, .. } = reloaded.send(request, InferOptions::now()).await else {
        panic!("served");
    };
    assert!(by.is_none());
}

#[actix::test]
async fn a_request_that_reaches_a_version_unloaded_otherwise_is_told_it_was_retired() {
    // Only an idle unload loads the version again for what still holds it: an admin's (or a
    // rollout's) unload is meant to take the version away, and says so.
    let f = start("admin-unload", 1024).await;
    let held = f.served("m", "1");
    let unload = f.supervisor.send(Unload {
        name: "m".into(),
        version: Some("1".into()),
    });
    assert_eq!(unload.await.unwrap().unwrap()["unloaded"], true);
    stopped(&held).await;
    match echo(&held).await {
        Err(ServeError::VersionRetired { model, version }) => {
            assert_eq!((model.as_str(), version.as_str()), ("m", "1"))
        }
        other => panic!("expected a retired version, got {other:?}"),
    }
    assert_eq!(f.label("m", "1"), "UNLOADED");
    // `send` gives the request back unrun, for REST or gRPC to send to the default now.
    let request = Arc::new(one_row(&held).unwrap());
    match held.send(request.clone(), InferOptions::now()).await {
        Sent::Retired {
            request: back,
            stopped,
        } => {
            assert!(Arc::ptr_eq(&back, &request), "the same request, unrun");
            assert_eq!(stopped.info.version, "1");
        }
        Sent::Answered { answer, .. } => panic!("expected it back, got {:?}", answer.map(|_| ())),
    }
}

#[actix::test]
async fn a_version_that_does_not_fit_stays_loadable() {
    // No memory budget at all: nothing fits.
    let f = start("does-not-fit", 0).await;
    assert_eq!(f.label("m", "1"), "UNLOADED");
    let catalog = f.catalog.snapshot();
    let VersionState::Cold { last_error, .. } = &catalog.models["m"].versions["1"] else {
        panic!("expected m:1 cold");
    };
    let reason = last_error.as_deref().unwrap_or_default();
    assert!(reason.starts_with(DOES_NOT_FIT), "{reason}");
    match f.ensure("m", None).await {
        Err(ServeError::ModelUnavailable { reason, .. }) => {
            assert!(reason.starts_with(DOES_NOT_FIT), "{reason}")
        }
        other => panic!("expected unavailable, got {:?}", other.map(|_| ())),
    }
    assert_eq!(f.label("m", "1"), "UNLOADED");
}

#[actix::test]
async fn blue_green_switches_the_default_and_unloads_the_old() {
    let f = start("blue-green", 1024).await;
    let answer = f.deploy("2", Strategy::BlueGreen).await.unwrap();
    assert_eq!(answer["strategy"], "blue_green");
    assert_eq!((&answer["from"], &answer["to"]), (&"1".into(), &"2".into()));
    assert_eq!(f.default_of("m"), "2");
    assert_eq!(f.label("m", "2"), "READY");
    assert_eq!(f.label("m", "1"), "UNLOADED");
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(served.info.version, "2");
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(f.rollouts().await["previous_default"]["m"], "1");
}

#[actix::test]
async fn a_failing_smoke_test_changes_nothing() {
    let f = start("smoke-test", 1024).await;
    f.loader.set(Behaviour::Fail);
    match f.deploy("2", Strategy::BlueGreen).await {
        Err(ServeError::Conflict(message)) => {
            assert!(message.contains("m:2 failed, nothing changed"), "{message}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(f.default_of("m"), "1");
    // The new version was loaded for the deployment only, so it goes again.
    assert_eq!(f.label("m", "2"), "UNLOADED");
    assert_eq!(f.label("m", "1"), "READY");
    assert!(f.rollback().await.is_err(), "nothing to roll back to");
    f.loader.set(Behaviour::Echo);
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

#[actix::test]
async fn a_rollback_restores_the_previous_default_once() {
    let f = start("rollback", 1024).await;
    f.deploy("2", Strategy::BlueGreen).await.unwrap();
    let answer = f.rollback().await.unwrap();
    assert_eq!((&answer["from"], &answer["to"]), (&"2".into(), &"1".into()));
    assert_eq!(f.default_of("m"), "1");
    assert_eq!(f.label("m", "1"), "READY");
    assert_eq!(f.label("m", "2"), "UNLOADED");
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(served.info.version, "1");
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // The previous default is consumed: a second rollback does not undo the first.
    match f.rollback().await {
        Err(ServeError::Conflict(message)) => {
            assert!(message.contains("no previous version"), "{message}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(f.default_of("m"), "1");
}

#[actix::test]
async fn a_canary_worse_than_stable_is_rolled_back() {
    let f = start("canary-worse", 1024).await;
    // Steps of 2 s: time enough to record the canary's failures before its first judgement.
    let answer = f.deploy_in_steps("2", Strategy::Canary, 2).await.unwrap();
    assert_eq!(answer["strategy"], "canary");
    assert_eq!(answer["steps"], serde_json::json!([50, 100]));
    let canary = f.catalog.snapshot().models["m"].canary.clone().unwrap();
    assert_eq!((canary.version.as_str(), canary.percent), ("2", 50));
    // While it runs: the default is unchanged, and neither version can be unloaded or deployed.
    assert_eq!(f.default_of("m"), "1");
    let unload = f.supervisor.send(Unload {
        name: "m".into(),
        version: Some("1".into()),
    });
    assert!(matches!(
        unload.await.unwrap(),
        Err(ServeError::Conflict(_))
    ));
    assert!(matches!(
        f.deploy("2", Strategy::BlueGreen).await,
        Err(ServeError::Conflict(_))
    ));
    // Another model's version of the same name is not held by this rollout.
    f.ensure("idle", Some("1")).await.unwrap();
    let unload = f.supervisor.send(Unload {
        name: "idle".into(),
        version: Some("1".into()),
    });
    assert_eq!(unload.await.unwrap().unwrap()["unloaded"], true);
    // Five failed answers from the canary, none from stable.
    let health = f.served("m", "2").health;
    for _ in 0..5 {
        health.record(true, Duration::from_millis(1));
    }
    eventually("the canary is rolled back", || {
        f.catalog.snapshot().models["m"].canary.is_none()
    })
    .await;
    assert_eq!(f.default_of("m"), "1");
    assert_eq!(f.label("m", "2"), "UNLOADED");
    assert_eq!(f.label("m", "1"), "READY");
    let rollouts = f.rollouts().await;
    assert_eq!(rollouts["running"], serde_json::json!({}));
    let reason = rollouts["last_rollback"]["m"].as_str().unwrap();
    assert!(
        reason.starts_with("canary worse than stable: errors 100.0%"),
        "{reason}"
    );
}

#[actix::test]
async fn a_canary_that_holds_up_is_promoted_step_by_step() {
    let f = start("canary-promoted", 1024).await;
    f.deploy_in_steps("2", Strategy::Canary, 0).await.unwrap();
    eventually("the canary is promoted", || f.default_of("m") == "2").await;
    assert!(f.catalog.snapshot().models["m"].canary.is_none());
    assert_eq!(f.label("m", "2"), "READY");
    assert_eq!(f.label("m", "1"), "UNLOADED");
    let rollouts = f.rollouts().await;
    assert_eq!(rollouts["running"], serde_json::json!({}));
    assert_eq!(rollouts["previous_default"]["m"], "1");
    // A promotion is a deployment like a switch: it can be rolled back.
    f.rollback().await.unwrap();
    assert_eq!(f.default_of("m"), "1");
}

#[actix::test]
async fn a_rolling_update_steps_one_replicas_share_and_an_operator_can_stop_it() {
    let f = start("rolling", 1024).await;
    assert!(
        matches!(
            f.deploy("1", Strategy::Rolling).await,
            Err(ServeError::Conflict(_))
        ),
        "m:1 is already the default"
    );
    let answer = f.deploy("2", Strategy::Rolling).await.unwrap();
    assert_eq!(answer["strategy"], "rolling");
    // m:2 has two replicas: half the traffic, then all of it.
    assert_eq!(answer["steps"], serde_json::json!([50, 100]));
    let running = &f.rollouts().await["running"]["m"];
    assert_eq!(
        (&running["canary"], &running["percent"]),
        (&"2".into(), &50.into())
    );
    let answer = f.rollback().await.unwrap();
    assert_eq!(answer["rolled_back"], "canary");
    assert!(f.catalog.snapshot().models["m"].canary.is_none());
    assert_eq!(f.label("m", "2"), "UNLOADED");
    assert_eq!(f.default_of("m"), "1");
    assert_eq!(
        f.rollouts().await["last_rollback"]["m"],
        "rolled back by an operator"
    );
}

#[actix::test]
async fn one_deploy_or_rollback_of_a_model_at_a_time() {
    let f = start("one-at-a-time", 1024).await;
    // Every model call takes 300 ms: the first deploy's smoke test holds it that long.
    f.loader.set(Behaviour::Sleep(Duration::from_millis(300)));
    let deploy = |version: &str, strategy| Deploy {
        name: "m".into(),
        version: version.into(),
        strategy,
        steps: vec![50, 100],
        step_secs: 60,
        smoke_test: true,
    };
    // Sent together: the first is handled (and reserves `m`) before the others.
    let first = f.supervisor.send(deploy("2", Strategy::BlueGreen));
    let second = f.supervisor.send(deploy("2", Strategy::Canary));
    let again = f.supervisor.send(deploy("1", Strategy::BlueGreen));
    let rollback = f.supervisor.send(Rollback { name: "m".into() });
    let unload = f.supervisor.send(Unload {
        name: "m".into(),
        version: Some("1".into()),
    });
    for refused in [second.await, again.await, rollback.await] {
        match refused.unwrap() {
            Err(ServeError::Conflict(message)) => assert_eq!(
                message,
                "a deployment of 'm' is in progress; wait for its answer and try again"
            ),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    // The versions of a deployment being prepared are held, like a running canary's.
    assert!(matches!(
        unload.await.unwrap(),
        Err(ServeError::Conflict(_))
    ));
    let answer = first.await.unwrap().unwrap();
    assert_eq!((&answer["from"], &answer["to"]), (&"1".into(), &"2".into()));
    assert_eq!(f.default_of("m"), "2");
    assert_eq!(f.label("m", "2"), "READY");
    assert_eq!(f.label("m", "1"), "UNLOADED");
    assert!(f.rollouts().await["running"]
        .as_object()
        .unwrap()
        .is_empty());

    // Answered: the model is free again. A rollback holds it in turn, while m:1 loads.
    let rollback = f.supervisor.send(Rollback { name: "m".into() });
    let during = f.supervisor.send(deploy("1", Strategy::BlueGreen));
    match during.await.unwrap() {
        Err(ServeError::Conflict(message)) => {
            assert!(
                message.starts_with("a rollback of 'm' is in progress"),
                "{message}"
            )
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(rollback.await.unwrap().unwrap()["to"], "1");
    assert_eq!(f.default_of("m"), "1");

    // A failed deployment frees the model too.
    f.loader.set(Behaviour::Fail);
    assert!(f.deploy("2", Strategy::BlueGreen).await.is_err());
    f.loader.set(Behaviour::Echo);
    f.deploy("2", Strategy::BlueGreen).await.unwrap();
    assert_eq!(f.default_of("m"), "2");
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}
