//! The image's command, run for real: the binary is started with the Dockerfile's command line
//! and environment, and must pass fly's health check, log JSON and exit 0 on SIGTERM in time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use streamserve::manifest::{Device, Manifest};
use toml::Value;

use super::dockerfile::{dockerfile, words, Dockerfile, Stage};
use super::fly::{duration, fly, fly_stage, get, get_str, health_check};
use super::{read, repo};

/// The GPU image rewrites its manifest with `sed -i 's/^X/Y/' <STREAMSERVE_MODELS>/models.toml`;
/// the same substitution applied to the repository's manifest.
fn gpu_manifest(docker: &Dockerfile) -> String {
    let gpu = docker.stage("gpu");
    let models = &gpu.env()["STREAMSERVE_MODELS"];
    let run = gpu
        .all("RUN")
        .find(|r| r.contains("sed -i") && r.contains("models.toml"))
        .expect("the gpu stage edits models.toml");
    let w = words(run);
    let i = w.iter().position(|w| w == "-i").unwrap();
    assert_eq!(w[i + 2], format!("{models}/models.toml"));
    let expr = &w[i + 1];
    let parts: Vec<&str> = expr.split('/').collect();
    assert!(
        parts.len() == 4 && parts[0] == "s" && parts[3].is_empty(),
        "expected s/^pattern/replacement/, got {expr}"
    );
    let pattern = parts[1]
        .strip_prefix('^')
        .expect("the sed pattern is anchored at the line start");
    assert!(
        !pattern.contains(['.', '*', '[', '$', '\\']),
        "the sed pattern should be literal: {pattern}"
    );
    let mut replaced = 0;
    let text: Vec<String> = read("models/models.toml")
        .lines()
        .map(|line| match line.strip_prefix(pattern) {
            Some(rest) => {
                replaced += 1;
                format!("{}{rest}", parts[2])
            }
            None => line.to_string(),
        })
        .collect();
    assert!(
        replaced > 0,
        "the gpu stage's sed matches nothing in models/models.toml"
    );
    text.join("\n") + "\n"
}

#[test]
fn gpu_image_manifest_asks_for_cuda_with_cpu_fallback() {
    let manifest = Manifest::parse(&repo().join("models"), &gpu_manifest(&dockerfile())).unwrap();
    for m in &manifest.models {
        assert_eq!(m.device, Device::Cuda(0), "{}", m.name);
        assert!(
            m.allow_cpu_fallback,
            "{} would be refused without a GPU",
            m.name
        );
    }
}

/// The server process, killed if a check fails before it was stopped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the stage's CMD with its ENV and nothing else from this process's environment but PATH
/// and ORT_DYLIB_PATH if set (here the library comes from the checkout's .venv, or that
/// variable, instead of the image's /usr/local/lib copy), the way the container would, except
/// for where it listens and where the models are. Checks that fly's health check answers 200
/// within its grace period, that every log line is JSON, and that SIGTERM ends the server with
/// status 0 within fly's kill_timeout.
async fn run_like_fly(stage: &Stage, config: &Value, models: &Path) -> Vec<Json> {
    let mut env = stage.env();
    env.insert("STREAMSERVE_HOST".into(), "127.0.0.1".into());
    env.insert("STREAMSERVE_PORT".into(), "0".into());
    env.insert("STREAMSERVE_MODELS".into(), models.display().to_string());
    let cmd = stage.cmd();
    let program = match cmd[0].as_str() {
        "streamserve" | "/usr/local/bin/streamserve" => env!("CARGO_BIN_EXE_streamserve"),
        other => panic!("CMD runs {other}"),
    };
    // A working directory that is not the checkout, as /app is not in the image.
    let workdir = std::env::temp_dir();
    let mut command = Command::new(program);
    command
        .args(&cmd[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&workdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for passthrough in ["PATH", "ORT_DYLIB_PATH"] {
        if let Some(value) = std::env::var_os(passthrough) {
            command.env(passthrough, value);
        }
    }
    let mut server = KillOnDrop(command.spawn().expect("streamserve starts"));
    let child = &mut server.0;

    let rx = crate::common::child::stdout_lines(child);
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut logs: Vec<Json> = Vec::new();
    fn log_line(line: String, logs: &mut Vec<Json>) {
        let json: Json = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!("log line is not JSON (STREAMSERVE_LOG_FORMAT=json): {line}")
        });
        logs.push(json);
    }

    // The address comes from the "streamserve listening" line.
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(remaining) {
            Ok(line) => {
                log_line(line, &mut logs);
                let last = logs.last().unwrap();
                if last["message"] == "streamserve listening" {
                    // gRPC listens beside HTTP, on a free port of its own as HTTP's is.
                    let grpc = last["grpc_addr"].as_str().expect("grpc_addr field");
                    assert!(
                        grpc.starts_with("127.0.0.1:") && !grpc.ends_with(":0"),
                        "{grpc}"
                    );
                    break last["addr"].as_str().expect("addr field").to_string();
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "never said it was listening; logs: {logs:?}\nstderr: {}",
                    stderr.join().unwrap()
                );
            }
        }
    };
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    // fly's check: GET <path>, each attempt bounded by the check's timeout, passing within the
    // grace period.
    let check = health_check(config);
    let path = get_str(check, "path");
    let timeout = duration(get(check, "timeout"));
    let grace = duration(get(check, "grace_period"));
    let client = reqwest::Client::builder().timeout(timeout).build().unwrap();
    let started = Instant::now();
    let status = loop {
        let status = match client.get(format!("http://{addr}{path}")).send().await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        };
        if status == 200 || started.elapsed() > grace {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 200, "{path} within the grace period {grace:?}");

    // fly stops the machine: kill_signal, then kill_timeout to exit by itself.
    let kill_timeout = duration(get(config, "kill_timeout"));
    assert_eq!(get_str(config, "kill_signal"), "SIGTERM");
    let stopping = Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if stopping.elapsed() > kill_timeout {
            let _ = child.kill();
            panic!("still running {kill_timeout:?} after SIGTERM: fly would kill it");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = stderr.join().unwrap();
    assert!(
        exit.success(),
        "exit status {exit} after SIGTERM; stderr: {stderr}"
    );
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        log_line(line, &mut logs);
    }
    assert!(
        logs.iter().any(|l| l["message"] == "streamserve stopped"),
        "logs: {logs:?}"
    );
    logs
}

#[tokio::test]
async fn image_command_serves_and_stops_as_fly_expects() {
    let docker = dockerfile();
    let config = fly("fly.toml");
    let stage = fly_stage(&docker, &config);
    let logs = run_like_fly(stage, &config, &repo().join("models")).await;
    assert!(logs.iter().all(|l| l["level"] != "ERROR"), "{logs:?}");
}

#[tokio::test]
async fn gpu_image_command_serves_without_a_gpu_through_cpu_fallback() {
    let docker = dockerfile();
    let config = fly("fly.gpu.toml");
    let stage = fly_stage(&docker, &config);
    // The gpu image's models directory: its rewritten manifest beside the bundled model files.
    let dir = std::env::temp_dir().join(format!("streamserve-deploy-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(repo().join("models")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "models.toml" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(dir.join("models.toml"), gpu_manifest(&docker)).unwrap();
    run_like_fly(stage, &config, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
}
