//! A `streamserve` process that a test starts as a user would (the built binary, not the
//! server in-process): its stdout read line by line on a thread of its own, the address its
//! "streamserve listening" line names, and a stop by SIGTERM as an orchestrator sends it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How long a start may take before the test fails with what the server printed: loading the
/// bundled models takes a few seconds, on CI's two busy cores some more.
const START_WITHIN: Duration = Duration::from_secs(90);

/// The child's stdout, line by line, read on a thread of its own.
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    read_lines(child, None)
}

/// As [`stdout_lines`], every line also kept in `kept` (what an instance logged so far).
pub fn stdout_lines_kept(
    child: &mut Child,
    kept: Arc<Mutex<Vec<String>>>,
) -> mpsc::Receiver<String> {
    read_lines(child, Some(kept))
}

fn read_lines(child: &mut Child, kept: Option<Arc<Mutex<Vec<String>>>>) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(kept) = &kept {
                kept.lock().unwrap().push(line.clone());
            }
            let _ = tx.send(line);
        }
    });
    rx
}

/// Reads lines until the "streamserve listening" one and returns the address it names
/// (`127.0.0.1:port`). A server that never says so fails the test with every line it printed.
pub fn listening_address(rx: &mpsc::Receiver<String>) -> String {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(START_WITHIN) {
            Ok(line) => {
                if line.contains("streamserve listening") {
                    let json: serde_json::Value =
                        serde_json::from_str(&line).expect("a JSON log line");
                    return json["addr"].as_str().expect("an addr field").to_string();
                }
                seen.push(line);
            }
            Err(_) => panic!(
                "the server never said it was listening; it printed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// Waits for the "listening" line on the child's stdout and returns the address it names.
pub fn wait_for_address(child: &mut Child) -> String {
    listening_address(&stdout_lines(child))
}

/// Sends SIGTERM and waits for the exit (at most 30 s: the default drain, then a kill and a
/// failed test).
pub fn stop(mut child: Child) -> ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    panic!("the server did not exit within 30 s of SIGTERM");
}
