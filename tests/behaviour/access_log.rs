//! The access line of a request refused for a named API key names the key (never the key
//! itself), as its audit event does: over its rate, over its requests in flight, a model
//! outside its scope, a model that does not exist; a key that is not valid, or none, stays
//! `-`. The line of a refusal without a version names the model the client asked for,
//! escaped (its series say `_unknown`). Read from the server's own log output (the binary,
//! JSON lines), over real sockets.

use crate::common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::child::{listening_address, stdout_lines, stop};
use common::*;
use serde_json::Value;

/// A server process on the bundled models with the keys file `keys`, logging JSON lines.
fn serve(keys: &std::path::Path) -> (Child, mpsc::Receiver<String>, String) {
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
        .args(["--models", "models", "--log-format", "json", "--api-keys"])
        .arg(keys)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = stdout_lines(&mut child);
    let addr = listening_address(&rx);
    (child, rx, addr)
}

fn entry(name: &str, key: &str, extra: &str) -> String {
    let sha = hex::encode(streamserve::access::keys::hash(key));
    format!("[[keys]]\nname = \"{name}\"\nsha256 = \"{sha}\"\n{extra}\n\n")
}

/// Sends an inference request to `model` with `key` (if any) and the request id `id`;
/// returns its status.
async fn infer(c: &reqwest::Client, addr: &str, model: &str, key: Option<&str>, id: &str) -> u16 {
    let mut request = c
        .post(format!("http://{addr}/v2/models/{model}/infer"))
        .header("x-request-id", id)
        .json(&mlp_request(&features(1, 1)));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_for_a_named_key_name_it_in_the_access_log_and_unknown_keys_stay_dashes() {
    let new = || streamserve::access::keys::new_key().unwrap();
    let (rated, single, any) = (new(), new(), new());
    let keys = model_dir("").join("keys.toml");
    let text = entry("rated", &rated, "models = [\"mlp\"]\nrequests_per_sec = 1")
        + &entry("single", &single, "models = [\"mlp\"]\nmax_concurrent = 1")
        + &entry("any", &any, "models = [\"*\"]");
    std::fs::write(&keys, text).unwrap();
    let (child, logs, addr) = serve(&keys);
    let c = client();
    // (request id, key presented, model, status expected, name expected in the line)
    let mut expected = Vec::new();
    let mut check = |id: &str, status: u16, want: u16, name: &str| {
        assert_eq!(status, want, "{id}");
        expected.push((id.to_string(), name.to_string()));
    };
    check(
        "ok",
        infer(&c, &addr, "mlp", Some(&rated), "ok").await,
        200,
        "rated",
    );
    let status = infer(&c, &addr, "mlp", Some(&rated), "over-rate").await;
    check("over-rate", status, 429, "rated");
    let status = infer(&c, &addr, "mlp_small", Some(&any), "scope-ok").await;
    check("scope-ok", status, 200, "any");
    let status = infer(&c, &addr, "mlp_small", Some(&single), "out-of-scope").await;
    check("out-of-scope", status, 403, "single");
    let status = infer(&c, &addr, "absent", Some(&any), "no-such-model").await;
    check("no-such-model", status, 404, "any");
    // A name with a line break in it: the line names it escaped (no forged line).
    let status = infer(&c, &addr, "absent%0Aforged", Some(&any), "forged-name").await;
    check("forged-name", status, 404, "any");
    let status = infer(&c, &addr, "mlp", Some("ssk_not_a_key"), "bad-key").await;
    check("bad-key", status, 401, "-");
    check(
        "no-key",
        infer(&c, &addr, "mlp", None, "no-key").await,
        401,
        "-",
    );
    // A request whose body never finishes holds the key's one place in flight.
    let mut held = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        held,
        "POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {single}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"inputs\""
    )
    .unwrap();
    held.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = infer(&c, &addr, "mlp", Some(&single), "over-concurrency").await;
    check("over-concurrency", status, 429, "single");
    drop(held);
    // Every line, then the audit events' names beside them.
    let mut lines = Vec::new();
    while let Ok(line) = logs.recv_timeout(Duration::from_secs(2)) {
        if let Ok(json) = serde_json::from_str::<Value>(&line) {
            lines.push(json);
        }
    }
    stop(child);
    for (id, name) in &expected {
        let line = lines
            .iter()
            .find(|l| l["target"] == "streamserve::access" && l["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no access line for {id}: {lines:?}"));
        assert_eq!(line["key"], name.as_str(), "{id}: {line}");
    }
    // A refusal names the model the client asked for (escaped), where its series say
    // `_unknown`; an answer names the version that answered.
    for (id, model, version) in [
        ("ok", "mlp", "1"),
        ("out-of-scope", "mlp_small", ""),
        ("no-such-model", "absent", ""),
        ("forged-name", "absent\\nforged", ""),
        ("bad-key", "mlp", ""),
        ("no-key", "mlp", ""),
    ] {
        let line = lines
            .iter()
            .find(|l| l["target"] == "streamserve::access" && l["request_id"] == id)
            .unwrap();
        assert_eq!(line["model"], model, "{id}: {line}");
        assert_eq!(line["version"], version, "{id}: {line}");
    }
    assert!(
        !lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("forged"))),
        "a forged line"
    );
    let text = serde_json::to_string(&lines).unwrap();
    for secret in [&rated, &single, &any] {
        assert!(!text.contains(secret.as_str()), "a key in the log");
    }
    // The audit trail names the same keys for the refusals it records.
    let audited: Vec<&str> = lines
        .iter()
        .filter(|l| l["target"] == "streamserve::audit")
        .filter_map(|l| l["key"].as_str())
        .collect();
    for name in ["rated", "single", "-"] {
        assert!(audited.contains(&name), "{name}: {audited:?}");
    }
}
