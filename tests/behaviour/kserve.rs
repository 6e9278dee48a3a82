//! The KServe examples in `deploy/kserve/` against the real binary, since no cluster runs here:
//! the runtime declares the protocols and format the InferenceServices ask for, and its
//! container's command line (with the InferenceService's environment, as KServe merges them)
//! starts a server that answers the probes, the metrics path and an inference: once on a model
//! directory where the storage initializer would put it, once following a registry.

use crate::common;

use std::path::Path;

use common::fleet::*;
use serde_yaml::Value;

fn manifest(name: &str) -> Value {
    let path = common::repo().join("deploy/kserve").join(name);
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The runtime container's args with `/mnt/models` pointing at `models` and the ports free.
fn runtime_args(models: &Path) -> Vec<String> {
    let runtime = manifest("cluster-serving-runtime.yaml");
    let container = &runtime["spec"]["containers"][0];
    let mut args = strings(&container["args"]);
    for arg in args.iter_mut() {
        if arg == "/mnt/models" {
            *arg = models.display().to_string();
        } else if arg == "8080" || arg == "8081" {
            *arg = "0".into();
        }
    }
    args
}

/// The server process, killed (and reaped) when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary as KServe would (runtime args, then the InferenceService's env) and
/// returns it with its address.
fn start(args: &[String], env: &[(String, String)]) -> (Server, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_streamserve"))
        .current_dir(common::repo())
        .args(args)
        .args(["--host", "127.0.0.1"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read for as long as it runs (a full pipe would stop its logging, and it), and killed if
    // it never listens.
    let lines = common::child::stdout_lines(&mut child);
    let server = Server(child);
    let addr = common::child::listening_address(&lines);
    (server, format!("http://{addr}"))
}

async fn probes_metrics_and_an_inference(url: &str) {
    let runtime = manifest("cluster-serving-runtime.yaml");
    let container = &runtime["spec"]["containers"][0];
    let http = common::client();
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = container[probe]["httpGet"]["path"].as_str().unwrap();
        let (code, _) = common::get(&http, &format!("{url}{path}")).await;
        assert_eq!(code, 200, "{probe} {path}");
    }
    let metrics = runtime["spec"]["annotations"]["prometheus.kserve.io/path"]
        .as_str()
        .unwrap();
    let (code, _) = common::get(&http, &format!("{url}{metrics}")).await;
    assert_eq!(code, 200);
    let (code, answer) = common::post(
        &http,
        &format!("{url}/v2/models/mlp/infer"),
        &common::mlp_request(&common::features(1, 1)),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
}

#[test]
fn the_runtime_offers_what_the_inference_services_ask_for() {
    let runtime = manifest("cluster-serving-runtime.yaml");
    assert_eq!(runtime["kind"], "ClusterServingRuntime");
    let protocols = strings(&runtime["spec"]["protocolVersions"]);
    assert_eq!(protocols, vec!["v2", "grpc-v2"]);
    let container = &runtime["spec"]["containers"][0];
    assert_eq!(container["name"], "kserve-container");
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    let annotated = &runtime["spec"]["annotations"]["prometheus.kserve.io/port"];
    assert_eq!(annotated.as_str().unwrap(), port.to_string());
    assert_eq!(
        container["securityContext"]["runAsUser"], 10001,
        "the image's user"
    );
    let format = &runtime["spec"]["supportedModelFormats"][0]["name"];
    for name in ["inference-service.yaml", "inference-service-registry.yaml"] {
        let isvc = manifest(name);
        assert_eq!(isvc["kind"], "InferenceService");
        let model = &isvc["spec"]["predictor"]["model"];
        assert_eq!(&model["modelFormat"]["name"], format, "{name}");
        assert_eq!(model["runtime"], runtime["metadata"]["name"], "{name}");
        // KServe appends an InferenceService's args to the runtime's: a flag given twice
        // would stop the server, so the examples configure through env.
        assert!(model["args"].is_null(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_serves_a_model_directory_from_mnt_models() {
    let (_server, url) = start(&runtime_args(&common::repo().join("models")), &[]);
    probes_metrics_and_an_inference(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_inference_service_follows_a_registry() {
    let registry = temp_dir("kserve-registry").display().to_string();
    let models = small_mlp_dir();
    registry_ok(
        &registry,
        &[],
        &["seed", "--models", models.to_str().unwrap()],
    );
    let isvc = manifest("inference-service-registry.yaml");
    let cache = temp_dir("kserve-cache");
    let mut env = Vec::new();
    for var in isvc["spec"]["predictor"]["model"]["env"]
        .as_sequence()
        .unwrap()
    {
        let name = var["name"].as_str().unwrap().to_string();
        let value = match name.as_str() {
            // The test's own registry and cache; the pod name for the instance id.
            "STREAMSERVE_REGISTRY" => registry.clone(),
            "STREAMSERVE_REGISTRY_CACHE" => cache.display().to_string(),
            "STREAMSERVE_INSTANCE_ID" => "streamserve-fleet-predictor-0".into(),
            _ if var["valueFrom"]["secretKeyRef"].is_mapping() => "from-a-secret".into(),
            _ => var["value"].as_str().unwrap().to_string(),
        };
        env.push((name, value));
    }
    // No storageUri: /mnt/models does not exist.
    let (_server, url) = start(&runtime_args(Path::new("/nonexistent/mnt/models")), &env);
    probes_metrics_and_an_inference(&url).await;
    let status = status(&registry, &[]);
    assert_eq!(
        status["instances"][0]["id"],
        "streamserve-fleet-predictor-0"
    );
}
