//! The `streamserve` binary as a user starts it: flags, environment, config file, a clear
//! message when something is missing, and a clean exit on SIGTERM, within the drain time
//! (at once on a second signal).

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::child::{listening_address, stdout_lines, stop, wait_for_address};
use common::*;

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamserve"));
    command
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[tokio::test]
async fn serve_with_flags_answers_and_exits_cleanly_on_sigterm() {
    let mut child = binary()
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--models",
            "models",
            "--log-format",
            "json",
        ])
        .spawn()
        .unwrap();
    let addr = wait_for_address(&mut child);
    let c = client();
    assert_eq!(
        get(&c, &format!("http://{addr}/v2/health/ready")).await.0,
        200
    );
    let (status, response) = post(
        &c,
        &format!("http://{addr}/v2/models/mlp/infer"),
        &mlp_request(&features(5, 1)),
    )
    .await;
    assert_eq!(status, 200, "{response}");
    assert!(stop(child).success(), "exit status 0 after SIGTERM");
}

#[tokio::test]
async fn serve_from_environment_and_config_file() {
    let dir = model_dir("");
    let config = dir.join("streamserve.toml");
    std::fs::write(
        &config,
        "host = \"127.0.0.1\"\nlog_format = \"json\"\nport = 1\n",
    )
    .unwrap();
    let mut child = binary()
        .arg("serve")
        .env("STREAMSERVE_CONFIG", &config)
        .env("STREAMSERVE_PORT", "0") // env wins over the file's port 1
        .env("STREAMSERVE_MODELS", repo().join("models"))
        .spawn()
        .unwrap();
    let addr = wait_for_address(&mut child);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(
        get(&client(), &format!("http://{addr}/v2/models/typed_ops"))
            .await
            .0,
        200
    );
    assert!(stop(child).success());
}

fn failure(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = binary()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!output.status.success(), "expected failure for {args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn missing_pieces_are_named() {
    let stderr = failure(
        &["serve", "--port", "0", "--host", "127.0.0.1"],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
    );
    assert!(
        stderr.contains("/nonexistent/libonnxruntime.so") && stderr.contains("does not exist"),
        "{stderr}"
    );

    let stderr = failure(
        &[
            "serve",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--models",
            "/nonexistent-models",
        ],
        &[],
    );
    assert!(
        stderr.contains("cannot read model manifest /nonexistent-models/models.toml"),
        "{stderr}"
    );

    let stderr = failure(&["serve", "--config", "/nonexistent.toml"], &[]);
    assert!(
        stderr.contains("cannot read config file /nonexistent.toml"),
        "{stderr}"
    );
}

#[test]
fn check_models_verifies_hashes() {
    let output = binary()
        .args(["check-models", "--models", "models"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    let dir = model_dir(&format!(
        "[[models]]\nname = \"mlp\"\nversion = \"1\"\nfile = \"{{models}}/mlp_small/1/model.onnx\"\nsha256 = \"{MLP_SHA}\"\n"
    ));
    let output = binary()
        .args(["check-models", "--models"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("sha256 mismatch"));
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut child = binary()
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--models",
            "models",
            "--log-format",
            "json",
        ])
        .env("STREAMSERVE_ADMIN_TOKEN", "drain")
        .spawn()
        .unwrap();
    let addr = wait_for_address(&mut child);
    let c = client();
    // Make every replica's next batch take 1.5 s, start requests, then ask the server to stop.
    let fault = serde_json::json!({"fault": {"kind": "slow", "ms": 1500}});
    let response = c
        .post(format!("http://{addr}/admin/models/mlp/faults"))
        .bearer_auth("drain")
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let in_flight: Vec<_> = (0..4u64)
        .map(|i| {
            let (c, url) = (c.clone(), format!("http://{addr}/v2/models/mlp/infer"));
            tokio::spawn(async move { post(&c, &url, &mlp_request(&features(i, 1))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
    for request in in_flight {
        let (code, body) = request.await.unwrap();
        assert_eq!(
            code, 200,
            "in-flight work finishes during the drain: {body}"
        );
    }
    assert!(status.success(), "exit 0 after draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_subcommands_drive_a_running_server() {
    let mut child = binary()
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--models",
            "models",
            "--log-format",
            "json",
        ])
        .env("STREAMSERVE_ADMIN_TOKEN", "cli")
        .spawn()
        .unwrap();
    let addr = wait_for_address(&mut child);
    let url = format!("http://{addr}");
    let admin = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_streamserve"))
            .args(["admin", "--url", &url])
            .args(args)
            .env("STREAMSERVE_ADMIN_TOKEN", "cli")
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = tokio::task::block_in_place(|| admin(&["models"]));
    assert!(ok, "{err}");
    assert!(out.contains("\"typed_ops\""), "{out}");
    let (ok, out, err) = tokio::task::block_in_place(|| admin(&["unload", "typed_ops"]));
    assert!(ok && out.contains("\"unloaded\": true"), "{out}{err}");
    let (_, list) = get(&client(), &format!("{url}/v2/models")).await;
    let typed = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "typed_ops")
        .unwrap()
        .clone();
    assert_eq!(typed["state"], "UNLOADED");
    let (ok, _, err) = tokio::task::block_in_place(|| admin(&["rollback", "typed_ops"]));
    assert!(
        !ok && err.contains("409") && err.contains("no previous version"),
        "{err}"
    );
    let (ok, _, err) = tokio::task::block_in_place(|| admin(&["--token", "wrong", "models"]));
    assert!(!ok && err.contains("401"), "{err}");
    assert!(stop(child).success());
}

/// Keep-alive clients sending back to back while SIGTERM arrives: every request the server
/// read (each has its access log line) reaches its client, answered, with `Connection: close`
/// once draining. A client may fail only the request it had not got into the server: a
/// refused connection, or one left in the listen backlog when the listener closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_racing_sigterm_on_keep_alive_connections_are_all_answered() {
    let mut child = binary()
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--models",
            "models",
            "--log-format",
            "json",
            "--drain-secs",
            "5",
        ])
        .spawn()
        .unwrap();
    let logs = stdout_lines(&mut child);
    let addr = listening_address(&logs);
    let url = format!("http://{addr}/v2/models/mlp/infer");
    let clients: Vec<_> = (0..8u64)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                // A client of its own: one keep-alive connection, reused request after request.
                let c = client();
                let (mut answered, mut failed) = (0usize, Vec::new());
                let until = std::time::Instant::now() + Duration::from_secs(8);
                while std::time::Instant::now() < until && failed.is_empty() {
                    match c
                        .post(&url)
                        .json(&mlp_request(&features(i, 1)))
                        .send()
                        .await
                    {
                        Ok(response) if response.status() == 200 => answered += 1,
                        Ok(response) => panic!("status {}", response.status()),
                        Err(e) => failed.push(format!("{e:?}")),
                    }
                }
                (answered, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
    assert!(status.success());
    let mut answered = 0;
    for client in clients {
        let (n, failed) = client.await.unwrap();
        assert!(n > 0);
        assert!(failed.len() <= 1, "{failed:?}");
        answered += n;
    }
    let read: usize = logs
        .try_iter()
        .filter(|l| l.contains("streamserve::access") && l.contains("\"status\":200"))
        .count();
    assert_eq!(read, answered, "every request the server read was answered");
}

/// A model name carrying a newline (`%0A`) and a huge request id cannot forge or bloat log
/// lines in the default text format.
#[tokio::test]
async fn client_text_in_logs_is_escaped_and_capped() {
    let mut child = binary()
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--models",
            "models",
        ])
        .spawn()
        .unwrap();
    let rx = stdout_lines(&mut child);
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server starts");
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let c = client();
    let forged = "x%0AINFO%20streamserve::access:%20forged";
    let response = c
        .post(format!("http://{addr}/v2/models/{forged}/infer"))
        .header("x-request-id", "r".repeat(16_000))
        .json(&mlp_request(&features(0, 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // The access line for that request, then nothing more from it.
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        lines.push(line);
    }
    stop(child);
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("unknown model"))
        .collect();
    assert_eq!(access.len(), 1, "{lines:?}");
    assert!(access[0].contains("x\\nINFO"), "{}", access[0]);
    assert!(
        access[0].len() < 2_000,
        "a capped line: {} bytes",
        access[0].len()
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("INFO streamserve::access: forged")),
        "{lines:?}"
    );
}

/// A server whose every `mlp` batch takes a minute, with `--drain-secs drain`, one request
/// in flight on it, and the signal `first` sent: returns the child and when it was signalled.
async fn signalled_with_a_request_past_the_drain(
    drain: u64,
    first: &str,
) -> (Child, std::time::Instant) {
    let drain = drain.to_string();
    let mut child = binary()
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
            "--models",
            "models",
            "--log-format",
            "json",
            "--drain-secs",
            &drain,
        ])
        .env("STREAMSERVE_ADMIN_TOKEN", "drain")
        .spawn()
        .unwrap();
    let addr = wait_for_address(&mut child);
    let c = client();
    let fault = serde_json::json!({"fault": {"kind": "slow", "ms": 60_000}, "count": 4});
    let response = c
        .post(format!("http://{addr}/admin/models/mlp/faults"))
        .bearer_auth("drain")
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let url = format!("http://{addr}/v2/models/mlp/infer");
    tokio::spawn(async move { c.post(url).json(&mlp_request(&features(1, 1))).send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = std::time::Instant::now();
    Command::new("kill")
        .args([first, &child.id().to_string()])
        .status()
        .unwrap();
    (child, signalled)
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    panic!("still running {within:?} after the signal");
}

/// The drain is counted from the signal and bounds every step of the stop: a request that
/// outlives it does not stretch the exit (actix's own graceful stop would wait a drain time
/// more), so an orchestrator's kill timeout of drain + a few seconds is never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outliving_the_drain_does_not_stretch_the_exit() {
    let (mut child, signalled) = signalled_with_a_request_past_the_drain(3, "-TERM").await;
    let status = tokio::task::block_in_place(|| wait_exit(&mut child, Duration::from_secs(20)));
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(2_900) && took <= Duration::from_millis(4_500),
        "exit {took:?} after SIGTERM with --drain-secs 3"
    );
}

/// A second Ctrl-C (or SIGTERM) during the drain stops the server at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    let (mut child, signalled) = signalled_with_a_request_past_the_drain(20, "-INT").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::block_in_place(|| wait_exit(&mut child, Duration::from_secs(10)));
    let took = signalled.elapsed();
    assert!(!status.success(), "a drain cut short is no clean exit");
    assert!(
        took < Duration::from_secs(3),
        "exit {took:?} after two SIGINTs"
    );
}

/// `check-models` finds its model directory as `serve` does: the flag over the environment,
/// the environment over the config file's `models`, the file over the default.
#[test]
fn check_models_reads_the_directory_the_config_file_names() {
    let bad = model_dir(&format!(
        "[[models]]\nname = \"mlp\"\nversion = \"1\"\nfile = \"{{models}}/mlp_small/1/model.onnx\"\nsha256 = \"{MLP_SHA}\"\n"
    ));
    let config = bad.join("streamserve.toml");
    std::fs::write(&config, format!("models = {:?}\n", bad.to_str().unwrap())).unwrap();
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let output = binary()
            .arg("check-models")
            .args(args)
            .env_remove("STREAMSERVE_MODELS")
            .env_remove("STREAMSERVE_CONFIG")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.success(), stdout)
    };
    let config = config.to_str().unwrap();
    let (ok, stdout) = check(&["--config", config], &[]);
    assert!(
        !ok && stdout.contains("sha256 mismatch"),
        "the file's models: {stdout}"
    );
    let (ok, stdout) = check(&[], &[("STREAMSERVE_CONFIG", config)]);
    assert!(
        !ok && stdout.contains("sha256 mismatch"),
        "the file from the environment: {stdout}"
    );
    let (ok, stdout) = check(&["--config", config, "--models", "models"], &[]);
    assert!(ok, "the flag wins over the file: {stdout}");
    let (ok, stdout) = check(&["--config", config], &[("STREAMSERVE_MODELS", "models")]);
    assert!(ok, "the environment wins over the file: {stdout}");
    let (ok, stdout) = check(
        &["--models", bad.to_str().unwrap()],
        &[("STREAMSERVE_MODELS", "models")],
    );
    assert!(
        !ok && stdout.contains("sha256 mismatch"),
        "the flag wins over the environment: {stdout}"
    );
}
