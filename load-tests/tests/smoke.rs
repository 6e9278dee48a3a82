//! Smoke test of the load generator against a real streamserve started in-process on
//! 127.0.0.1 (a free port) with the real `mlp` model: behaviour only, never timings.
//!
//! Needs libonnxruntime, which `streamserve::runtime::init` finds in the checkout's `.venv`
//! (installed by `bash scripts/setup.sh`).

use std::time::Duration;

use streamserve_load::bench::{self, ServerSetup, TempModelDir};
use streamserve_load::rest::{self, RestOptions};

/// `mlp` alone, batching on, one replica.
fn start() -> (TempModelDir, streamserve::server::Running) {
    let model = bench::default_model_file()
        .canonicalize()
        .expect("models/mlp/1/model.onnx exists");
    let sha256 = streamserve::manifest::sha256_file(&model).unwrap();
    let setup = ServerSetup {
        replicas: 1,
        ..ServerSetup::batching_on()
    };
    let dir = TempModelDir::create("smoke", &setup.manifest(&model, &sha256)).unwrap();
    let running = bench::start_server(&dir.path, setup.max_batch_size)
        .expect("streamserve starts and serves mlp");
    (dir, running)
}

fn check(options: RestOptions) {
    let report = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(rest::run(&options))
        .expect("the load run completes");
    let summary = report.summary();
    assert!(report.ok > 0, "no successful request:\n{summary}");
    assert_eq!(report.error_count(), 0, "errors during the run:\n{summary}");
    assert_eq!(report.warmup_errors, 0, "errors during warm-up:\n{summary}");
    assert!(report.first_error.is_none(), "{summary}");
    // Every success passed check_mlp_response (outputs FP32 [rows, 16]) and was timed.
    assert_eq!(report.latency_us.len(), report.ok, "{summary}");
    // The server reports the batch each request rode in: at least its own rows, at most 64.
    let mean = report.mean_batch_rows();
    assert!(
        mean >= options.rows as f64 && mean <= 64.0,
        "mean batch {mean}:\n{summary}"
    );
}

#[test]
fn rest_load_against_a_real_server() {
    let (_dir, running) = start();
    let url = format!("http://{}", running.addr);
    let base = RestOptions {
        url,
        concurrency: 4,
        duration: Duration::from_millis(1500),
        warmup: Duration::from_millis(200),
        request_timeout: Duration::from_secs(10),
        ..RestOptions::default()
    };
    // JSON tensor data, 1 row; then binary tensor data, 3 rows per request.
    check(base.clone());
    check(RestOptions {
        binary: true,
        rows: 3,
        duration: Duration::from_millis(700),
        ..base
    });
    bench::stop_server(&running);
}

#[test]
fn non_loopback_targets_are_refused_before_any_traffic() {
    for url in [
        "http://192.0.2.1:8080",
        "http://localhost:8080",
        "http://example.invalid",
    ] {
        let options = RestOptions {
            url: url.into(),
            ..RestOptions::default()
        };
        let err = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(rest::run(&options))
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{url}: {err}");
    }
}
