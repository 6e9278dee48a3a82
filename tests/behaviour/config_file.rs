//! The binary's configuration as an operator writes it: a TOML file with the admin token in a
//! file of its own, and a misspelt key that stops start-up with a message naming it; a bad
//! line never quoted with its secret; values no server can run with refused at start-up,
//! naming the key; an admin token from the environment with a trailing newline; a misspelt
//! `STREAMSERVE_*` variable warned about by name; ports that cannot be bound refused before
//! the models load, and ports held (and readiness waiting) while they load.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::child::{listening_address, stdout_lines, stdout_lines_kept, wait_for_address};
use common::*;

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamserve"));
    command
        .current_dir(repo())
        .env_remove("STREAMSERVE_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// `serve` on a free HTTP port of 127.0.0.1, without gRPC, logging JSON, on `models`.
fn serve_on_a_free_port(models: &std::path::Path) -> Command {
    let mut command = binary();
    command
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(["--grpc-port", "off", "--log-format", "json", "--models"])
        .arg(models);
    command
}

#[tokio::test]
async fn the_admin_token_is_read_from_the_file_the_config_names() {
    let dir = model_dir("");
    let token = dir.join("admin-token");
    std::fs::write(&token, "from-a-file\n").unwrap();
    let config = dir.join("streamserve.toml");
    std::fs::write(
        &config,
        format!(
            "host = \"127.0.0.1\"\nport = 0\nlog_format = \"json\"\nmodels = {:?}\nadmin_token_file = {:?}\n",
            repo().join("models").to_str().unwrap(),
            token.to_str().unwrap(),
        ),
    )
    .unwrap();
    let mut child = binary()
        .args(["serve", "--config"])
        .arg(&config)
        .spawn()
        .unwrap();
    let logged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rx = stdout_lines_kept(&mut child, logged.clone());
    let addr = listening_address(&rx);
    let c = client();
    let url = format!("http://{addr}/admin/models");
    let with = |token: &str| c.get(&url).bearer_auth(token).send();
    assert_eq!(with("from-a-file").await.unwrap().status(), 200);
    assert_eq!(with("from-a-fil").await.unwrap().status(), 401);
    child.kill().unwrap();
    child.wait().unwrap();
    // Every line it printed: the reader ends (and the channel closes) at the end of stdout.
    while rx.recv_timeout(Duration::from_secs(10)).is_ok() {}
    let logged = logged.lock().unwrap().join("\n");
    assert!(
        !logged.contains("from-a-file"),
        "the token is never logged: {logged}"
    );
}

#[test]
fn a_misspelt_key_stops_start_up_naming_the_key_and_the_file() {
    let dir = model_dir("");
    let config = dir.join("streamserve.toml");
    std::fs::write(&config, "port = 0\nkeep_alive_sec = 10\n").unwrap();
    let output = binary()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(config.to_str().unwrap())
            && stderr.contains("line 2")
            && stderr.contains("unknown field `keep_alive_sec`"),
        "{stderr}"
    );
}

/// The binary's stderr for `args`, which must fail before it starts serving. A model
/// directory that does not exist makes a server that took the configuration fail (and exit)
/// too, with another message, instead of serving for ever.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = binary()
        .args(args)
        .args(["--models", "/nonexistent-models"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    stderr
}

#[test]
fn a_bad_config_line_is_told_without_its_secret() {
    let dir = model_dir("");
    let secret = "s3cr3t-ADMIN-token-value";
    for text in [
        format!("port = 0\nadmin_token = \"{secret}\"  ,\n"),
        format!("port = 0\nadmin_tokn = \"{secret}\"\n"),
        "port = 0\nstream_token_key = 1234567890123456789012345678901234567890\n".to_string(),
    ] {
        let config = dir.join("secret.toml");
        std::fs::write(&config, &text).unwrap();
        let stderr = refused(&["serve", "--config", config.to_str().unwrap()], &[]);
        assert!(
            !stderr.contains(secret) && !stderr.contains("1234567890123"),
            "{text}: {stderr}"
        );
        assert!(
            stderr.contains("line 2") && stderr.contains("<redacted>"),
            "{stderr}"
        );
    }
}

#[test]
fn values_no_server_can_run_with_are_refused_naming_the_key() {
    let max = u64::MAX.to_string();
    for (flag, value, key) in [
        ("--keep-alive-secs", max.as_str(), "keep_alive_secs"),
        ("--body-timeout-secs", &max, "body_timeout_secs"),
        ("--drain-secs", &max, "drain_secs"),
        ("--stream-resume-secs", &max, "stream_resume_secs"),
        ("--stream-idle-secs", &max, "stream_idle_secs"),
        ("--stream-checkpoint-ms", &max, "stream_checkpoint_ms"),
        ("--http-workers", "20000", "http_workers"),
        ("--registry-poll-secs", "1e20", "registry_poll_secs"),
        ("--registry-poll-secs", "NaN", "registry_poll_secs"),
        ("--registry-poll-secs", "inf", "registry_poll_secs"),
        ("--log", "streamserve=debugg", "streamserve=debugg"),
        ("--log", "", "log is empty"),
    ] {
        let stderr = refused(&["serve", "--port", "0", flag, value], &[]);
        assert!(stderr.contains(key), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flag} {value}: {stderr}");
    }
    let dir = model_dir("");
    let config = dir.join("nan.toml");
    std::fs::write(&config, "registry_poll_secs = nan\n").unwrap();
    let stderr = refused(&["serve", "--config", config.to_str().unwrap()], &[]);
    assert!(
        stderr.contains("registry_poll_secs") && !stderr.contains("null"),
        "{stderr}"
    );
    let stderr = refused(
        &["serve", "--port", "0"],
        &[("STREAMSERVE_ADMIN_TOKEN", "   ")],
    );
    assert!(stderr.contains("admin_token is empty"), "{stderr}");
}

#[tokio::test]
async fn an_admin_token_from_the_environment_is_trimmed() {
    let mut child = serve_on_a_free_port(&repo().join("models"))
        .env("STREAMSERVE_ADMIN_TOKEN", "s3cret\n")
        .spawn()
        .unwrap();
    let addr = wait_for_address(&mut child);
    let url = format!("http://{addr}/admin/models");
    let status = client()
        .get(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status.status(), 200);
}

/// A misspelt `STREAMSERVE_*` variable is ignored, as a deployment platform's own variables
/// must be, but not silently: one warning per variable, naming it and the one it probably
/// meant, never its value. Variables of other subcommands (`admin`'s `STREAMSERVE_URL`) are
/// no mistake.
#[test]
fn an_unknown_streamserve_variable_is_warned_about_by_name_only() {
    let secret = "s3cr3t-in-a-misspelt-variable";
    let mut command = binary();
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STREAMSERVE_") {
            command.env_remove(key);
        }
    }
    let output = command
        .args([
            "serve",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--log-format",
            "json",
        ])
        .args(["--models", "/nonexistent-models"])
        .env("STREAMSERVE_MAX_INFLIHGT", "10")
        .env("STREAMSERVE_ADMIN_TOKN", secret)
        .env("STREAMSERVE_NOTHING_LIKE_ANY_FLAG_AT_ALL", secret)
        .env("STREAMSERVE_URL", "http://127.0.0.1:1")
        .env("STREAMSERVE_HTTP_WORKERS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "{stdout}{stderr}"
    );
    let warnings: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|json| json["level"] == "WARN" && json.get("variable").is_some())
        .collect();
    let named: Vec<(&str, Option<&str>)> = warnings
        .iter()
        .map(|w| (w["variable"].as_str().unwrap(), w["did_you_mean"].as_str()))
        .collect();
    for want in [
        ("STREAMSERVE_MAX_INFLIHGT", Some("STREAMSERVE_MAX_INFLIGHT")),
        ("STREAMSERVE_ADMIN_TOKN", Some("STREAMSERVE_ADMIN_TOKEN")),
        ("STREAMSERVE_NOTHING_LIKE_ANY_FLAG_AT_ALL", None),
    ] {
        assert_eq!(
            named.iter().filter(|n| **n == want).count(),
            1,
            "{want:?} in {named:?}"
        );
    }
    assert_eq!(
        named.len(),
        3,
        "known variables are not warned about: {named:?}"
    );
}

/// A port in use stops the start at once, naming the address, before ONNX Runtime or any
/// model is loaded: the model directory that does not exist is never reached.
#[test]
fn a_port_in_use_stops_the_start_before_the_models_load() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    for (flag, what) in [
        ("--port", "HTTP"),
        ("--grpc-port", "gRPC"),
        ("--stream-port", "--stream-port"),
    ] {
        let mut args = vec![
            "serve",
            "--host",
            "127.0.0.1",
            "--models",
            "/nonexistent-models",
        ];
        if flag != "--port" {
            args.extend(["--port", "0"]);
        }
        args.extend([flag, &port]);
        let output = binary()
            .args(&args)
            .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot listen on 127.0.0.1:{port}"))
                && stderr.contains(what)
                && stderr.contains("in use"),
            "{flag}: {stderr}"
        );
        assert!(
            !stderr.contains("onnxruntime") && !stderr.contains("manifest"),
            "{flag}: the port is checked first: {stderr}"
        );
    }
    drop(held);
}

/// Kills the server when a test ends, passing or not (a server blocked on a model file would
/// otherwise outlive it).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// While the models load, the ports are already held (bound, the free port told), and a
/// request waits in the listen backlog: readiness is not answered, let alone true, until they
/// are in. A model file that is a FIFO holds the loading until the test writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_models_load_the_ports_are_held_and_readiness_waits() {
    let typed_ops = repo().join("models/typed_ops/1/model.onnx");
    let dir = model_dir(&format!(
        "[[models]]\nname = \"typed_ops\"\nversion = \"1\"\nfile = {:?}\nsha256 = \"e491291eeeb4b687cde854db925c3c769498cd67b25c9f54b5eb5b14534916de\"\nmax_batch_size = 32\n\n[[models]]\nname = \"held\"\nversion = \"1\"\nfile = \"held.onnx\"\nsha256 = \"{}\"\n",
        typed_ops.to_str().unwrap(),
        "0".repeat(64),
    ));
    let fifo = dir.join("held.onnx");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut child = serve_on_a_free_port(&dir).spawn().unwrap();
    let rx = stdout_lines(&mut child);
    let child = Killed(child);
    let mut seen = Vec::new();
    let bound = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("ports never bound:\n{}", seen.join("\n")));
        if line.contains("ports bound") {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            break json["addr"].as_str().unwrap().to_string();
        }
        assert!(!line.contains("streamserve listening"), "{line}");
        seen.push(line);
    };
    assert!(
        std::net::TcpListener::bind(&bound).is_err(),
        "{bound} is held while the models load"
    );
    let c = client();
    let early = tokio::spawn({
        let url = format!("http://{bound}/v2/health/ready");
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !early.is_finished(),
        "answered while a model was still loading"
    );
    // The refused FIFO model leaves typed_ops, so the server turns ready once loading is over.
    std::thread::spawn(move || {
        use std::io::Write;
        let mut writer = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
        let _ = writer.write_all(b"not a model");
    });
    // Listening once the FIFO's model is refused.
    let addr = listening_address(&rx);
    assert_eq!(
        addr, bound,
        "the port told before loading is the one served"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), early)
        .await
        .expect("answered once the models are in")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "ready once the models are in");
    drop(child);
}
