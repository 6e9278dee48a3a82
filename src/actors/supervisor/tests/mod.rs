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

// The tests, by concern.
mod loading;
mod rollouts;
