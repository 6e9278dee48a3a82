//! Support for the registry and fleet tests: a real S3-compatible server (moto's, from the
//! project's venv), the `streamserve` binary as fleet instances (separate processes, so that
//! one can be killed), the `registry` commands, and a TCP gate that cuts the way to the store
//! (to make the registry unreachable and reachable again).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::repo;

/// An instance's `GET /admin/registry` (its admin token is the fleet tests' own).
pub async fn admin_registry(url: &str) -> Value {
    super::client()
        .get(format!("{url}/admin/registry"))
        .bearer_auth("fleet-test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A fresh empty directory.
pub fn temp_dir(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "streamserve-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A model directory whose manifest lists `mlp` version 1 as the small (fast-loading) mlp
/// file, so that versions of `mlp` tell apart by `model_version` alone.
pub fn small_mlp_dir() -> PathBuf {
    let dir = temp_dir("models");
    let file = repo().join("models/mlp_small/1/model.onnx");
    std::fs::write(
        dir.join("models.toml"),
        format!(
            "[[models]]\nname = \"mlp\"\nversion = \"1\"\nfile = \"{}\"\nsha256 = \"{}\"\nmax_batch_size = 64\nmax_queue_delay_ms = 0.0\n",
            file.display(),
            super::MLP_SMALL_SHA
        ),
    )
    .unwrap();
    dir
}

/// moto's S3 server, stopped when dropped (its stdin closes).
pub struct S3 {
    child: Child,
    _stdin: ChildStdin,
    pub endpoint: String,
}

impl S3 {
    pub fn start() -> S3 {
        let python = repo().join(".venv/bin/python");
        let mut child = Command::new(&python)
            .arg(repo().join("tests/support/s3_server.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (bash scripts/setup.sh --dev): {e}",
                    python.display()
                )
            });
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("the S3 server said {line:?}"))
            .to_string();
        S3 {
            child,
            _stdin: stdin,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A new bucket, and the registry URI of a prefix in it.
    pub fn registry(&self, bucket: &str) -> String {
        let status = put_empty(&format!("{}/{bucket}", self.endpoint));
        assert!(status < 300, "creating bucket {bucket}: {status}");
        format!("s3://{bucket}/registry")
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking `PUT` with an empty body (creating a bucket), from a thread without a runtime.
fn put_empty(url: &str) -> u16 {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = TcpStream::connect(host).unwrap();
    write!(
        stream,
        "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Puts an object straight into the S3 server (moto checks no signature), whatever its key:
/// what a hand-made `aws s3 cp` may leave in a registry.
pub fn put_object(endpoint: &str, bucket: &str, key: &str, body: &[u8]) {
    let host = endpoint.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(host).unwrap();
    write!(
        stream,
        "PUT /{bucket}/{key} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status: u16 = answer.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(status < 300, "PUT {key}: {answer}");
}

/// The environment that points the AWS client at `endpoint` (moto takes any keys).
pub fn s3_env(endpoint: &str) -> Vec<(String, String)> {
    vec![
        ("AWS_ENDPOINT_URL".into(), endpoint.into()),
        ("AWS_ACCESS_KEY_ID".into(), "streamserve-test".into()),
        (
            "AWS_SECRET_ACCESS_KEY".into(),
            "streamserve-test-secret".into(),
        ),
        ("AWS_REGION".into(), "us-east-1".into()),
    ]
}

/// Runs `streamserve registry --registry REGISTRY ARGS...`.
pub fn registry_cli(registry: &str, env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamserve"))
        .current_dir(repo())
        .arg("registry")
        .args(["--registry", registry])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("STREAMSERVE_REGISTRY")
        .output()
        .unwrap()
}

/// A local registry directory seeded (as the docs do) with `mlp` 1, the small mlp file, as
/// its default.
pub fn seeded_registry() -> String {
    let registry = temp_dir("registry").display().to_string();
    let models = small_mlp_dir();
    let out = registry_ok(
        &registry,
        &[],
        &["seed", "--models", models.to_str().unwrap()],
    );
    assert!(
        out.contains("pushed   mlp:1") && out.contains("default  mlp = 1"),
        "{out}"
    );
    registry
}

/// [`registry_cli`] that must succeed; returns its standard output.
pub fn registry_ok(registry: &str, env: &[(String, String)], args: &[&str]) -> String {
    let out = registry_cli(registry, env, args);
    assert!(
        out.status.success(),
        "registry {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `registry status --json`.
pub fn status(registry: &str, env: &[(String, String)]) -> Value {
    serde_json::from_str(&registry_ok(registry, env, &["status", "--json"])).unwrap()
}

/// A model's desired state from `status`.
pub fn desired<'a>(status: &'a Value, model: &str) -> &'a Value {
    status["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == model)
        .unwrap_or_else(|| panic!("no desired state of {model}: {status}"))
}

/// The events of a model's history, as `(event, version)`.
pub fn events(status: &Value, model: &str) -> Vec<(String, String)> {
    desired(status, model)["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["version"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One `streamserve serve` process of a fleet, killed when dropped.
pub struct Instance {
    child: Option<Child>,
    pub id: String,
    pub url: String,
    logs: Arc<Mutex<Vec<String>>>,
}

/// How a test starts an instance.
pub struct InstanceSetup<'a> {
    pub id: &'a str,
    pub registry: &'a str,
    pub models: &'a Path,
    pub cache: &'a Path,
    pub env: &'a [(String, String)],
    pub extra: &'a [&'a str],
}

impl Instance {
    pub fn start(setup: InstanceSetup<'_>) -> Instance {
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamserve"))
            .current_dir(repo())
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--grpc-port",
                "off",
            ])
            .args([
                "--log-format",
                "json",
                "--http-workers",
                "1",
                "--admin-token",
                "fleet-test",
            ])
            .arg("--models")
            .arg(setup.models)
            .args(["--registry", setup.registry, "--registry-poll-secs", "0.3"])
            .arg("--registry-cache")
            .arg(setup.cache)
            .args(["--instance-id", setup.id])
            .args(setup.extra)
            .envs(setup.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let lines = super::child::stdout_lines_kept(&mut child, logs.clone());
        let addr = super::child::listening_address(&lines);
        Instance {
            child: Some(child),
            id: setup.id.to_string(),
            url: format!("http://{addr}"),
            logs,
        }
    }

    /// What it logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// SIGKILL: no drain, no goodbye (its report stays until it goes stale).
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, and wait for the exit.
    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "instance did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP forwarder in front of a server that a test can close (every connection through it is
/// cut and new ones are refused) and open again: the network between instances and the store.
pub struct Gate {
    pub addr: String,
    open: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Gate {
    pub fn new(target: &str) -> Gate {
        let target = target.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let open = Arc::new(AtomicBool::new(true));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (open2, streams2) = (open.clone(), streams.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if !open2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                streams2.lock().unwrap().push(client.try_clone().unwrap());
                streams2.lock().unwrap().push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Gate {
            addr,
            open,
            streams,
        }
    }

    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// One answer the load saw.
#[derive(Clone, Debug)]
pub struct Answer {
    pub instance: usize,
    /// Milliseconds since the Unix epoch, when it was sent and when it came back.
    pub sent_ms: u64,
    pub received_ms: u64,
    pub status: u16,
    /// `model_version` of a 200; the error text otherwise.
    pub version: String,
}

/// Concurrent 1-row `mlp` requests spread over instances, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Answer>>>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Load {
    /// `clients` tasks, client `i` sending to `urls[i % urls.len()]` one request at a time.
    pub fn start(urls: &[String], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let http = super::client();
        let body = super::mlp_request(&super::features(7, 1));
        let tasks = (0..clients)
            .map(|i| {
                let (stop, http, body) = (stop.clone(), http.clone(), body.clone());
                let instance = i % urls.len();
                let url = format!("{}/v2/models/mlp/infer", urls[instance]);
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let sent_ms = now_ms();
                        let (status, version) = match http.post(&url).json(&body).send().await {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                let text = response.text().await.unwrap_or_default();
                                let value: Value =
                                    serde_json::from_str(&text).unwrap_or(Value::Null);
                                let version = match value["model_version"].as_str() {
                                    Some(v) if status == 200 => v.to_string(),
                                    _ => text,
                                };
                                (status, version)
                            }
                            Err(e) => (0, e.to_string()),
                        };
                        answers.push(Answer {
                            instance,
                            sent_ms,
                            received_ms: now_ms(),
                            status,
                            version,
                        });
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    answers
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients and returns every answer, in the order they came back.
    pub async fn finish(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_by_key(|a| a.received_ms);
        all
    }
}

/// Asserts that every answer was a 200, naming the first few that were not.
pub fn assert_all_ok(answers: &[Answer]) {
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(!answers.is_empty(), "the load sent nothing");
}

/// haproxy (Debian's package: `bash scripts/setup.sh --fleet`) in front of `backends`, round
/// robin per connection, no stickiness, health-checked on readiness; killed when dropped.
pub struct Haproxy {
    child: Child,
    pub url: String,
}

impl Haproxy {
    pub fn start(backends: &[String]) -> Haproxy {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, url)| format!("    server s{i} {}\n", url.trim_start_matches("http://")))
            .collect();
        let config = format!(
            "global\n    maxconn 2048\n\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n    timeout tunnel 60s\n    retries 3\n    option redispatch\n\nfrontend streams\n    bind 127.0.0.1:{port}\n    default_backend fleet\n\nbackend fleet\n    balance roundrobin\n    option httpchk GET /v2/health/ready\n    default-server check inter 200ms fall 1 rise 2\n{servers}"
        );
        let path = temp_dir("haproxy").join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start haproxy ({e}): bash scripts/setup.sh --fleet installs it")
            });
        let url = format!("http://127.0.0.1:{port}");
        wait_for("haproxy to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Haproxy { child, url }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
