//! The live status page (`/` and `/status`, docs/status-page.md), tested as an operator meets
//! it: a real server on the bundled models under concurrent REST load, and Debian's Chromium,
//! headless, loading the page and running its script; the DOM it ends with must show the
//! models, their replicas' health, throughput, p50/p99 and the machine. Without the admin token
//! the page shows that one is required and no model at all. The JSON tests pin `/status`'s
//! access rules (token, keyed server without a token, development server) and its fields.
//!
//! Chromium comes from `scripts/setup.sh --observe` (test.sh runs it); `CHROMIUM_BIN`
//! names another binary (not a `STREAMSERVE_*` name: the server warns about each variable of
//! its prefix that it does not read). Every wait is bounded, and Chromium's whole process group is killed
//! when a load ends, however it ends.

use crate::common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "status-page-token";

fn chromium() -> String {
    std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Chromium's process group, killed when dropped.
struct Browser(i32);

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this test started; no memory is involved.
        unsafe {
            libc::kill(-self.0, libc::SIGKILL);
        }
    }
}

/// Loads `url` in headless Chromium with a fresh profile, lets its page run for `budget_ms`
/// of virtual time (timers fast-forward, fetches are real) and returns the DOM it ends with.
fn dump_dom(url: &str, budget_ms: u64) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let profile = std::env::temp_dir().join(format!(
        "streamserve-chromium-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&profile).unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}): install it with scripts/setup.sh --observe",
                chromium()
            )
        });
    let browser = Browser(child.id() as i32);
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).ok();
        text
    });
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "chromium did not finish loading {url} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(browser);
    let dom = reader.join().unwrap();
    std::fs::remove_dir_all(&profile).ok();
    assert!(dom.contains("</html>"), "chromium dumped no page:\n{dom}");
    dom
}

/// The text of the `<td class="{class}">` cell in the page's row for `model`.
fn cell(dom: &str, model: &str, class: &str) -> String {
    let start = dom
        .find(&format!("<tr data-model=\"{model}\""))
        .unwrap_or_else(|| panic!("no row for {model} in:\n{dom}"));
    let row = &dom[start..start + dom[start..].find("</tr>").unwrap()];
    let open = format!("<td class=\"{class}");
    let at = row
        .find(&open)
        .unwrap_or_else(|| panic!("no {class} cell for {model} in {row}"));
    let cell = &row[at..];
    let text = &cell[cell.find('>').unwrap() + 1..cell.find("</td>").unwrap()];
    // Tags inside (the state's tag) are dropped.
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => plain.push(c),
            _ => {}
        }
    }
    plain
}

/// The text of the card `id`'s value.
fn card(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no card {id} in:\n{dom}"));
    let value = &dom[start..];
    let value = &value[value.find("class=\"value\">").unwrap() + 14..];
    value[..value.find('<').unwrap()].to_string()
}

fn number(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a number: {text:?}"))
}

async fn status(c: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = c.get(format!("{url}/status"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let code = response.status().as_u16();
    (code, response.json().await.unwrap())
}

/// Concurrent REST inference on `mlp` until `stop` (or 40 s at most).
fn load(url: &str, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..6)
        .map(|seed| {
            let (c, url, stop) = (client(), url.to_string(), stop.clone());
            tokio::spawn(async move {
                let body = mlp_request(&features(seed, 1));
                let (mut ok, started) = (0, Instant::now());
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(40) {
                    let (code, _) = post(&c, &format!("{url}/v2/models/mlp/infer"), &body).await;
                    ok += u64::from(code == 200);
                }
                ok
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_shows_live_models_latency_and_machine_under_load_and_nothing_without_the_token() {
    let url = start(&repo().join("models"), |c| {
        c.admin_token = Some(TOKEN.into())
    });
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let loaders = load(&url, stop.clone());
    // The load is on: mlp has answers in its recent window.
    let started = Instant::now();
    loop {
        let (code, body) = status(&c, &url, Some(TOKEN)).await;
        assert_eq!(code, 200, "{body}");
        if model_row(&body, "mlp")["traffic"]["recent"]["requests"].as_u64() > Some(20) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no load: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let page = format!("{url}/#token={TOKEN}");
    let dom = tokio::task::spawn_blocking(move || dump_dom(&page, 3000))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for loader in loaders {
        answered += loader.await.unwrap();
    }
    assert!(answered > 0);

    // Neither "admin token required" nor "server unreachable" is shown.
    assert!(!dom.contains("banner shown"), "a banner is shown:\n{dom}");
    for model in ["mlp", "mlp_small", "silero_vad", "typed_ops"] {
        assert_eq!(cell(&dom, model, "model"), model);
        assert!(cell(&dom, model, "version").starts_with('1'), "{model}");
        assert_eq!(cell(&dom, model, "state"), "SERVING", "{model}");
    }
    assert_eq!(cell(&dom, "mlp", "replicas"), "2/2");
    assert_eq!(cell(&dom, "silero_vad", "replicas"), "2/2");
    assert_eq!(cell(&dom, "mlp_small", "replicas"), "1/1");
    let rps = number(&cell(&dom, "mlp", "rps"));
    assert!(rps > 0.0, "mlp throughput {rps} under load");
    let (p50, p99) = (
        number(&cell(&dom, "mlp", "p50")),
        number(&cell(&dom, "mlp", "p99")),
    );
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} p99 {p99}");
    assert!(number(&cell(&dom, "mlp", "total")) > 20.0);
    // The machine: a CPU share and a memory figure (their values are the machine module's).
    let cpu = card(&dom, "card-cpu");
    assert!(cpu.ends_with(" %") || cpu == "\u{2014}", "cpu {cpu:?}");
    let ram = card(&dom, "card-ram");
    assert!(
        ["B", "KiB", "MiB", "GiB"].iter().any(|u| ram.ends_with(u)),
        "ram {ram:?}"
    );
    assert!(card(&dom, "card-rps").ends_with("req/s"));
    assert!(dom.contains("no rollout in progress"), "{dom}");
    assert!(!dom.contains(TOKEN), "the token shows in the page");

    // A fresh browser without the token: told to give one, and shown no model.
    let page = format!("{url}/");
    let locked = tokio::task::spawn_blocking(move || dump_dom(&page, 1500))
        .await
        .unwrap();
    assert!(
        locked.contains("class=\"banner shown\" id=\"auth\"")
            && locked.contains("admin token required"),
        "{locked}"
    );
    for model in ["mlp", "silero_vad", "typed_ops"] {
        assert!(
            !locked.contains(model),
            "{model} shows without the token:\n{locked}"
        );
    }
}

#[tokio::test]
async fn status_needs_the_admin_token_when_the_server_has_one() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "tiny"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        "#
    ));
    let url = start(&dir, |c| c.admin_token = Some(TOKEN.into()));
    let c = client();
    let (code, body) = status(&c, &url, None).await;
    assert_eq!(code, 401, "{body}");
    assert!(!body.to_string().contains("tiny"));
    assert_eq!(status(&c, &url, Some("wrong")).await.0, 401);
    for _ in 0..3 {
        let (code, _) = post(
            &c,
            &format!("{url}/v2/models/tiny/infer"),
            &mlp_request(&features(1, 2)),
        )
        .await;
        assert_eq!(code, 200);
    }
    let (code, body) = status(&c, &url, Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    assert!(!body.to_string().contains(TOKEN));
    let server = &body["server"];
    assert_eq!(server["version"], env!("CARGO_PKG_VERSION"));
    assert!(server["uptime_s"].as_f64().unwrap() > 0.0);
    assert_eq!(server["window_s"], 10.0);
    for field in [
        "cpu_seconds_total",
        "resident_memory_bytes",
        "threads",
        "open_fds",
        "cores",
    ] {
        assert!(
            body["machine"][field].is_number(),
            "machine.{field}: {body}"
        );
    }
    let tiny = model_row(&body, "tiny");
    assert_eq!(tiny["state"], "SERVING");
    assert_eq!(tiny["default"], true);
    assert_eq!(tiny["router"]["replicas"], 1);
    assert_eq!(tiny["router"]["healthy_replicas"], 1);
    assert_eq!(tiny["router"]["restarts"], 0);
    assert_eq!(tiny["traffic"]["requests"], 3);
    let recent = &tiny["traffic"]["recent"];
    assert_eq!(recent["requests"], 3);
    assert_eq!(recent["degraded_share"], 0.0);
    assert!(recent["requests_per_sec"].as_f64().unwrap() > 0.0);
    assert!(recent["p50_ms"].as_f64().unwrap() <= recent["p99_ms"].as_f64().unwrap());
    assert!(tiny["monitor"]["reference"].is_string(), "{tiny}");
    assert!(body["rollouts"]["running"].is_object(), "{body}");
    assert!(body["fleet"].is_null());

    // The page itself holds no data; it is served with its policy to anyone.
    let page = c.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("connect-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("streamserve status") && !html.contains("tiny"));
}

#[tokio::test]
async fn a_keyed_server_without_admin_token_hides_status_and_a_development_server_shows_it() {
    let manifest = format!(
        r#"
        [[models]]
        name = "open_tiny"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        "#
    );
    let dir = model_dir(&manifest);
    let key = streamserve::access::keys::new_key().unwrap();
    let keys = dir.join("keys.toml");
    let sha = hex::encode(streamserve::access::keys::hash(&key));
    std::fs::write(
        &keys,
        format!("[[keys]]\nname = \"k\"\nsha256 = \"{sha}\"\nmodels = [\"*\"]\n"),
    )
    .unwrap();
    let keyed = start(&dir, |c| c.api_keys = Some(keys.clone()));
    let c = client();
    // Not even with a valid API key: the page shows what keyed callers may not see.
    for token in [None, Some(key.as_str())] {
        let (code, body) = status(&c, &keyed, token).await;
        assert_eq!(code, 401, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("--admin-token") && error.contains("API keys"),
            "{error}"
        );
        assert!(!body.to_string().contains("open_tiny"));
    }
    // The same server with an admin token answers with it.
    let both = start(&dir, |c| {
        c.api_keys = Some(keys.clone());
        c.admin_token = Some(TOKEN.into());
    });
    assert_eq!(status(&c, &both, Some(TOKEN)).await.0, 200);
    assert_eq!(status(&c, &both, Some(&key)).await.0, 401);
    // Neither keys nor token: a development server, open to anyone.
    let open = start(&model_dir(&manifest), |_| {});
    let (code, body) = status(&c, &open, None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(model_row(&body, "open_tiny")["state"], "SERVING");
}

#[test]
fn the_page_says_the_server_is_unreachable_when_status_does_not_answer() {
    use std::io::{Read, Write};
    // A stand-in server: the page at /, and a connection closed unanswered for anything else.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let page = include_str!("../../src/api/status.html");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut head = [0u8; 4096];
            let n = stream.read(&mut head).unwrap_or(0);
            if head[..n].starts_with(b"GET / ") {
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{page}",
                    page.len()
                );
            }
        }
    });
    let dom = dump_dom(&format!("http://{addr}/"), 1500);
    assert!(
        dom.contains("class=\"banner shown\" id=\"unreachable\"")
            && dom.contains("server unreachable"),
        "{dom}"
    );
    assert!(!dom.contains("class=\"banner shown\" id=\"auth\""));
}

/// A token the Authorization header cannot carry (a smart quote pasted around it; a malformed
/// escape in the fragment) is dropped, and the page asks for the token again saying why,
/// instead of claiming that the server is unreachable.
#[tokio::test]
async fn a_token_with_invalid_characters_is_refused_with_the_reason_not_as_unreachable() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "tiny"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        "#
    ));
    let url = start(&dir, |c| c.admin_token = Some(TOKEN.into()));
    for fragment in [
        format!("%E2%80%9C{TOKEN}%E2%80%9D"),
        format!("{TOKEN}%E2"),
        "caf%C3%A9".to_string(),
    ] {
        let page = format!("{url}/#token={fragment}");
        let dom = tokio::task::spawn_blocking(move || dump_dom(&page, 2000))
            .await
            .unwrap();
        assert!(
            dom.contains("class=\"banner shown\" id=\"auth\"")
                && dom.contains("token has invalid characters"),
            "{fragment}: {dom}"
        );
        assert!(
            !dom.contains("class=\"banner shown\" id=\"unreachable\""),
            "{fragment}: the page says unreachable:\n{dom}"
        );
        assert!(!dom.contains("tiny"), "{fragment}: a model shows:\n{dom}");
    }
}

#[tokio::test]
async fn status_and_admin_give_the_replicas_running_and_the_config_the_configured_count() {
    // Two replicas at load, one once the second has idled past the scale-down delay.
    let manifest = format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        replicas = 2
        min_replicas = 1
        max_replicas = 2
        max_batch_size = 4
        "#
    );
    let url = start(&model_dir(&manifest), |config| {
        config.admin_token = Some(TOKEN.into());
        config.cpu_budget = 4;
    });
    let c = client();
    let mut scaled = None;
    for _ in 0..150 {
        let (_, body) = status(&c, &url, Some(TOKEN)).await;
        let mlp = model_row(&body, "mlp").clone();
        if mlp["router"]["replicas"] == 1 {
            scaled = Some(mlp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mlp = scaled.expect("mlp did not scale down to 1 replica");
    assert_eq!(mlp["replicas"], 1, "the replicas running: {mlp}");
    assert_eq!(mlp["configured_replicas"], 2, "the manifest's: {mlp}");
    let (_, admin) = common::admin_call(&c, &format!("{url}/admin/models"), TOKEN, None).await;
    assert_eq!(admin["models"][0]["replicas"], 1, "{admin}");
    assert_eq!(admin["models"][0]["configured_replicas"], 2, "{admin}");
    // The model metadata gives the running count; Triton's config the configured one.
    let (_, metadata) = get(&c, &format!("{url}/v2/models/mlp")).await;
    assert_eq!(metadata["parameters"]["replicas"], 1, "{metadata}");
    let (_, config) = get(&c, &format!("{url}/v2/models/mlp/config")).await;
    assert_eq!(config["instance_group"][0]["count"], 2, "{config}");
}
