//! The registry at its edges, against a real S3 server (moto's) and the real `streamserve`
//! binary: a model file rewritten while `registry push` reads it, a multipart upload that the
//! store fails half-way, two processes given one `--instance-id`, and a start with a warm
//! cache while the registry's address swallows every packet.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fleet::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A raw HTTP request straight to the S3 server: status and body. moto checks no signature,
/// but reads objects only for a request that has one.
fn s3_request(endpoint: &str, method: &str, path: &str) -> (u16, Vec<u8>) {
    let host = endpoint.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(host).unwrap();
    let auth = "AWS4-HMAC-SHA256 Credential=streamserve-test/20260101/us-east-1/s3/aws4_request, \
                SignedHeaders=host, Signature=00";
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, answer[split + 4..].to_vec())
}

/// The keys under `prefix` in `bucket`.
fn keys(endpoint: &str, bucket: &str, prefix: &str) -> Vec<String> {
    let (status, body) = s3_request(
        endpoint,
        "GET",
        &format!("/{bucket}?list-type=2&prefix={prefix}"),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8(body).unwrap();
    text.split("<Key>")
        .skip(1)
        .map(|rest| rest.split("</Key>").next().unwrap().to_string())
        .collect()
}

/// The multipart uploads in progress in `bucket` (neither completed nor aborted).
fn uploads_in_progress(endpoint: &str, bucket: &str) -> usize {
    let (status, body) = s3_request(endpoint, "GET", &format!("/{bucket}?uploads"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    String::from_utf8(body).unwrap().matches("<Upload>").count()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `contents[i]` into the FIFO at `path` for the i-th process that opens it to read,
/// until `done`: a file that is one thing to its first reader and another to its second.
fn feed_fifo(path: &Path, contents: Vec<Vec<u8>>, done: Arc<AtomicBool>) {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        for content in contents {
            // Non-blocking: an open for writing fails (ENXIO) until a reader has it open.
            let mut fifo = loop {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
                {
                    Ok(fifo) => break fifo,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            use std::os::fd::AsRawFd;
            // SAFETY: clears O_NONBLOCK on a descriptor this thread owns.
            unsafe { libc::fcntl(fifo.as_raw_fd(), libc::F_SETFL, 0) };
            let _ = fifo.write_all(&content);
            drop(fifo);
            // The reader sees its end of file once no writer is left: give it time to, so
            // that the next content goes to the next reader.
            std::thread::sleep(Duration::from_millis(500));
        }
    });
}

#[test]
fn a_file_rewritten_during_a_push_is_never_published_under_another_files_hash() {
    let s3 = S3::start();
    let registry = s3.registry("edges-push");
    let env = s3_env(&s3.endpoint);
    let dir = temp_dir("fifo");
    let fifo = dir.join("model.onnx");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // Two parts each (8 MiB parts), so that a part is in the store before the end is read.
    let first = vec![b'a'; 9 * 1024 * 1024];
    let second = vec![b'b'; 9 * 1024 * 1024];
    let done = Arc::new(AtomicBool::new(false));
    feed_fifo(&fifo, vec![first.clone(), second.clone()], done.clone());
    let out = registry_cli(
        &registry,
        &env,
        &[
            "push",
            "--name",
            "m",
            "--version",
            "1",
            "--no-inspect",
            fifo.to_str().unwrap(),
        ],
    );
    done.store(true, Ordering::SeqCst);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("the push said: {said}");
    let stored = keys(&s3.endpoint, "edges-push", "registry/models/m/1/");
    if out.status.success() {
        // Published: then the file stored is the one its record names, byte for byte.
        let (status, record) = s3_request(
            &s3.endpoint,
            "GET",
            "/edges-push/registry/models/m/1/version.json",
        );
        assert_eq!(status, 200);
        let record: Value = serde_json::from_slice(&record).unwrap();
        let sha = record["sha256"].as_str().unwrap();
        let (status, file) = s3_request(
            &s3.endpoint,
            "GET",
            &format!("/edges-push/registry/models/m/1/{sha}.onnx"),
        );
        assert_eq!(status, 200);
        assert_eq!(
            sha256_hex(&file),
            sha,
            "the record names sha256 {sha}, the object stored under it is other bytes \
             ({} bytes; the record says {}): {said}",
            file.len(),
            record["size"]
        );
        assert_eq!(record["size"], file.len() as u64);
    } else {
        assert!(said.contains("changed while it was being pushed"), "{said}");
        assert!(stored.is_empty(), "a refused push left {stored:?}");
    }
    assert_eq!(
        uploads_in_progress(&s3.endpoint, "edges-push"),
        0,
        "an upload was left half-done in the bucket: {said}"
    );
}

/// A forwarder to the S3 server that answers every upload of part 1 itself with a 400, and
/// passes everything else on, one request per connection.
fn part_failing_proxy(target: &str) -> String {
    let target = target.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let target = target.clone();
            std::thread::spawn(move || relay_one(client, &target));
        }
    });
    addr
}

/// One request from `client`, answered (part 1) or relayed; a client that goes away in the
/// middle (the push failed) just ends it.
fn relay_one(client: TcpStream, target: &str) -> Option<()> {
    let mut reader = BufReader::new(client.try_clone().ok()?);
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().ok()?;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        if !lower.starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    let mut client = client;
    let first =
        String::from_utf8_lossy(&head[..head.iter().position(|b| *b == b'\n')?]).to_string();
    if first.starts_with("PUT ") && first.contains("partNumber=1&") {
        let _ = client.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return Some(());
    }
    let mut server = TcpStream::connect(target).ok()?;
    server.write_all(&head).ok()?;
    server.write_all(&body).ok()?;
    let mut answer = Vec::new();
    let _ = server.read_to_end(&mut answer);
    // The answer's own connection header goes: this connection ends with this answer.
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let answer_head: String = String::from_utf8_lossy(&answer[..split])
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let _ = client.write_all(answer_head.as_bytes());
    let _ = client.write_all(b"Connection: close\r\n\r\n");
    let _ = client.write_all(&answer[split + 4..]);
    Some(())
}

#[test]
fn a_multipart_upload_that_fails_half_way_is_aborted() {
    let s3 = S3::start();
    let registry = s3.registry("edges-abort");
    let proxy = part_failing_proxy(&s3.endpoint);
    let env = s3_env(&proxy);
    // Six 8 MiB parts: more than the upload keeps in flight, so that part 1's failure is
    // met while the file is still being sent, not when the upload is completed.
    let dir = temp_dir("big");
    let file = dir.join("big.onnx");
    let bytes: Vec<u8> = (0..48 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let out = registry_cli(
        &registry,
        &env,
        &[
            "push",
            "--name",
            "big",
            "--version",
            "1",
            "--no-inspect",
            file.to_str().unwrap(),
        ],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("the push said: {said}");
    assert!(!out.status.success(), "the push went through: {said}");
    assert!(!said.contains("streamserve-test-secret"), "{said}");
    assert_eq!(
        uploads_in_progress(&s3.endpoint, "edges-abort"),
        0,
        "the failed upload's parts were left in the bucket: {said}"
    );
    assert!(
        keys(&s3.endpoint, "edges-abort", "registry/models/big/").is_empty(),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_one_instance_id_are_found_out() {
    let s3 = S3::start();
    let registry = s3.registry("edges-twins");
    let env = s3_env(&s3.endpoint);
    let models = small_mlp_dir();
    registry_ok(
        &registry,
        &env,
        &["seed", "--models", models.to_str().unwrap()],
    );
    let empty = temp_dir("none");
    let start = |id: &str| {
        Instance::start(InstanceSetup {
            id,
            registry: &registry,
            models: &empty,
            cache: &temp_dir("cache"),
            env: &env,
            extra: &[],
        })
    };

    // A process killed without leaving, and its restart under the same id: no duplicate.
    start("single").kill();
    let single = start("single");
    let a = start("twin");
    let b = start("twin");
    for twin in [&a, &b] {
        wait_for(
            "the duplicate to be noticed",
            Duration::from_secs(30),
            || {
                twin.logs()
                    .contains("a duplicate --instance-id")
                    .then_some(())
            },
        );
        let account = admin_registry(&twin.url).await;
        let duplicate = account["duplicate_instance"].as_str().unwrap_or_default();
        assert!(duplicate.contains("same --instance-id"), "{account}");
    }
    let report = wait_for("the report to say so", Duration::from_secs(30), || {
        let status = status(&registry, &env);
        let twin = status["instances"]
            .as_array()?
            .iter()
            .find(|r| r["id"] == "twin")?
            .clone();
        twin["duplicate"].is_string().then_some(twin)
    });
    assert!(!report["boot"].as_str().unwrap().is_empty(), "{report}");
    let text = registry_ok(&registry, &env, &["status"]);
    assert!(
        text.contains("warning: another process reports as"),
        "{text}"
    );

    assert!(!single.logs().contains("duplicate"), "{}", single.logs());
    let account = admin_registry(&single.url).await;
    assert!(account["duplicate_instance"].is_null(), "{account}");
}

/// A TCP listener that takes connections and never answers them (a black hole) until it is
/// opened; then it forwards new connections to `target`.
struct Hole {
    addr: String,
    open: Arc<AtomicBool>,
}

impl Hole {
    fn new(target: &str) -> Hole {
        let target = target.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let open = Arc::new(AtomicBool::new(false));
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let open2 = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if !open2.load(Ordering::SeqCst) {
                    held.lock().unwrap().push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                copy(client.try_clone().unwrap(), server.try_clone().unwrap());
                copy(server, client);
            }
        });
        Hole { addr, open }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_a_warm_cache_does_not_wait_for_a_silent_registry() {
    let s3 = S3::start();
    let registry = s3.registry("edges-hole");
    let env = s3_env(&s3.endpoint);
    let models = small_mlp_dir();
    registry_ok(
        &registry,
        &env,
        &["seed", "--models", models.to_str().unwrap()],
    );
    let empty = temp_dir("none");
    let cache = temp_dir("cache");
    // Once with the registry there, to warm the cache.
    Instance::start(InstanceSetup {
        id: "warm",
        registry: &registry,
        models: &empty,
        cache: &cache,
        env: &env,
        extra: &[],
    })
    .stop();

    let hole = Hole::new(&s3.endpoint);
    let silent = s3_env(&hole.addr);
    let began = Instant::now();
    let instance = Instance::start(InstanceSetup {
        id: "cold",
        registry: &registry,
        models: &empty,
        cache: &cache,
        env: &silent,
        extra: &[],
    });
    let took = began.elapsed();
    eprintln!("listening {took:?} after the start, the registry silent");
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} to listen:\n{}",
        instance.logs()
    );
    let http = common::client();
    let body = common::mlp_request(&common::features(1, 1));
    let (code, answer) = common::post(
        &http,
        &format!("{}/v2/models/mlp/infer", instance.url),
        &body,
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["model_version"], "1", "{answer}");
    let account = admin_registry(&instance.url).await;
    assert_eq!(account["reachable"], false, "{account}");

    // It keeps trying: once the registry answers, its report is there.
    hole.open();
    wait_for(
        "the report once the registry answers",
        Duration::from_secs(90),
        || {
            let status = status(&registry, &env);
            status["instances"]
                .as_array()?
                .iter()
                .any(|r| r["id"] == "cold")
                .then_some(())
        },
    );
}
