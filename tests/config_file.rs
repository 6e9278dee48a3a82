//! The binary's configuration as an operator writes it: a TOML file with the admin token in a
//! file of its own, and a misspelt key that stops start-up with a message naming it.

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
