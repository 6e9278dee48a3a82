//! The binary's configuration as an operator writes it: a TOML file with the admin token in a
//! file of its own, and a misspelt key that stops start-up with a message naming it; a bad
//! line never quoted with its secret; values no server can run with refused at start-up,
//! naming the key; an admin token from the environment with a trailing newline.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

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
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut logged = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("never listening:\n{}", logged.join("\n")));
        if line.contains("streamserve listening") {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            break json["addr"].as_str().unwrap().to_string();
        }
        logged.push(line);
    };
    let c = client();
    let url = format!("http://{addr}/admin/models");
    let with = |token: &str| c.get(&url).bearer_auth(token).send();
    assert_eq!(with("from-a-file").await.unwrap().status(), 200);
    assert_eq!(with("from-a-fil").await.unwrap().status(), 401);
    child.kill().unwrap();
    child.wait().unwrap();
    while let Ok(line) = rx.try_recv() {
        logged.push(line);
    }
    let logged = logged.join("\n");
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
        .args(["--log-format", "json", "--models"])
        .arg(repo().join("models"))
        .env("STREAMSERVE_ADMIN_TOKEN", "s3cret\n")
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let addr = stdout
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("streamserve listening"))
        .map(|line| {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            json["addr"].as_str().unwrap().to_string()
        })
        .expect("listening");
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
