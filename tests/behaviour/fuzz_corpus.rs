//! Every committed fuzz input, seed corpus (fuzz/corpus/<target>/) and crash reproducer
//! (fuzz/regressions/<target>/), run through the fuzz targets' own checks (fuzz/harness.rs) in
//! the plain `cargo test`: a parser that starts panicking, or allocating from a declared size
//! again, fails here with no fuzzing tools installed.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

/// The inputs committed for `target`, with their paths (for the failure message).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut found = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            found.push((path, bytes));
        }
    }
    found.sort();
    found
}

fn run_all(target: &str, check: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(
        inputs
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("seed-")),
        "no seed corpus for {target}: run python3 fuzz/make_seeds.py"
    );
    for (path, bytes) in &inputs {
        // One input at a time, so that a failure names the file that caused it.
        if std::panic::catch_unwind(|| check(bytes)).is_err() {
            panic!("{target} failed on {}", path.display());
        }
    }
}

#[test]
fn kserve_json() {
    run_all("kserve_json", harness::kserve_json);
}

#[test]
fn kserve_binary() {
    run_all("kserve_binary", harness::kserve_binary);
}

#[test]
fn tensor_bytes() {
    run_all("tensor_bytes", harness::tensor_bytes);
}

#[test]
fn ws_message() {
    run_all("ws_message", harness::ws_message);
}

#[test]
fn ws_audio() {
    run_all("ws_audio", harness::ws_audio);
}

#[test]
fn wav() {
    run_all("wav", harness::wav);
}

/// The inputs that found bugs stay in the suite (the tests above would pass without them).
#[test]
fn committed_reproducers_are_present() {
    for (target, name) in [
        ("kserve_json", "declared-shape-allocates-128mb"),
        ("ws_message", "padding-overlaps-previous-segment"),
        ("wav", "float-sample-out-of-range"),
    ] {
        assert!(
            inputs(target)
                .iter()
                .any(|(p, _)| p.ends_with(format!("regressions/{target}/{name}"))),
            "fuzz/regressions/{target}/{name} is missing"
        );
    }
}
