//! Smoke test of the load generator against a real streamserve started in-process on
//! 127.0.0.1 (a free port) with the real `mlp` model: behaviour only, never timings.
//!
//! Needs libonnxruntime, which `streamserve::runtime::init` finds in the checkout's `.venv`
//! (installed by `bash scripts/setup.sh`).

use std::path::Path;
use std::time::Duration;

use streamserve_load::bench::{self, ServerSetup, TempModelDir};
use streamserve_load::cli::{BenchCommon, Threads};
use streamserve_load::overload::MlpOpenLoop;
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

/// The open-loop part of a shortened `timeline` or `overload` run: its files in `out`, no wait
/// for a quiet machine, two client threads, a bounded number of requests in flight.
fn shortened(out: &Path, defaults: MlpOpenLoop) -> MlpOpenLoop {
    MlpOpenLoop {
        max_in_flight: 512,
        common: BenchCommon {
            out: Some(out.to_path_buf()),
            quiet_wait: Duration::ZERO,
            threads: Threads {
                client_threads: Some(2),
            },
            ..defaults.common
        },
        ..defaults
    }
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

/// `loadgen timeline`, shortened: a rate step, every replica panicking and one hanging, all
/// within 3 s. Behaviour only: every request accounted for, the faults accepted by the admin
/// API and seen by the server, the report, results and plot written.
#[test]
fn timeline_run_records_bins_events_and_the_server_view() {
    use streamserve_load::timeline::{self, At, TimelineOptions};
    let out = std::env::temp_dir().join(format!("loadgen-timeline-smoke-{}", std::process::id()));
    let defaults = TimelineOptions::default();
    let options = TimelineOptions {
        rate: Some(300.0),
        step_at: At(Some(Duration::from_millis(800))),
        step_for: Duration::from_millis(500),
        step_share: 3.0,
        panic_at: At(Some(Duration::from_millis(1800))),
        hang_at: At(Some(Duration::from_millis(2300))),
        hang_ms: 700,
        hang_timeout_ms: 300,
        duration: Duration::from_secs(3),
        bin: Duration::from_millis(100),
        mlp: shortened(&out, defaults.mlp.clone()),
        ..defaults
    };
    let outcome = timeline::run(&options).expect("the timeline run completes");
    let report = &outcome.open_loop;
    let summary = report.summary();
    assert_eq!(report.unanswered, 0, "{summary}");
    assert_eq!(report.transport + report.invalid, 0, "{summary}");
    assert!(
        report.statuses.keys().all(|c| *c == 429 || *c == 503),
        "{summary}"
    );
    assert!(report.ok() > 0, "{summary}");

    let results = &outcome.results;
    let bins = results["bins"].as_array().unwrap();
    assert_eq!(bins.len(), 30);
    let binned: u64 = bins.iter().map(|b| b["scheduled"].as_u64().unwrap()).sum();
    assert_eq!(
        binned, report.scheduled,
        "every scheduled request is in one bin"
    );
    let events = results["events"].as_array().unwrap();
    assert_eq!(events.len(), 4, "{events:?}");
    for e in events.iter().filter(|e| !e["answer"].is_null()) {
        assert!(e["answer"].as_str().unwrap().starts_with("200 "), "{e}");
    }
    let server = results["server"].as_array().unwrap();
    let restarts = server.last().expect("/metrics was scraped")["restarts"]
        .as_f64()
        .unwrap();
    assert!(restarts >= 1.0, "the server saw no restart: {server:?}");
    assert_eq!(results["phases"].as_array().unwrap().len(), 5);

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Settling"), "{md}");
    assert!(out.join("results.json").is_file());
    let svg = std::fs::read_to_string(out.join(timeline::PLOT_FILE)).unwrap();
    assert!(svg.contains("every replica panics"));
    let _ = std::fs::remove_dir_all(&out);
}

/// `loadgen overload`, shortened: both admission variants in-process, one level each.
/// Behaviour only: every request accounted for, a table per variant and the comparison in
/// the report, the plot written.
#[test]
fn overload_runs_each_admission_variant_on_a_server_of_its_own() {
    use streamserve::config::Admission;
    use streamserve_load::overload::{self, OverloadOptions};
    let out = std::env::temp_dir().join(format!("loadgen-overload-smoke-{}", std::process::id()));
    let defaults = streamserve_load::cli::defaults::<OverloadOptions>();
    let options = OverloadOptions {
        multipliers: vec![2.0],
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        admission: vec![Admission::Static, Admission::Adaptive],
        mlp: MlpOpenLoop {
            capacity_duration: Duration::from_secs(1),
            capacity_concurrency: 16,
            ..shortened(&out, defaults.mlp.clone())
        },
        ..defaults
    };
    overload::run(&options).expect("the overload run completes");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let variants = results["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    for (v, mode) in variants.iter().zip(["static", "adaptive"]) {
        assert_eq!(v["admission"], mode);
        let level = &v["levels"][0];
        assert_eq!(level["unanswered"], 0, "{level}");
        assert_eq!(level["transport"], 0, "{level}");
        assert!(level["goodput_per_s"].as_f64().unwrap() > 0.0, "{level}");
        // The door's limit, read back from the server's /metrics. Not compared with the mode:
        // the metrics are process-wide, and other tests here run servers of their own.
        assert!(level["admission_limit"].is_number(), "{level}");
    }
    assert_eq!(
        variants[0]["levels"][0]["offered_per_s"], variants[1]["levels"][0]["offered_per_s"],
        "both variants are offered the same rate"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("### adaptive against static"), "{md}");
    let svg = std::fs::read_to_string(out.join(overload::PLOT_FILE)).unwrap();
    assert!(svg.contains("adaptive goodput"));
    let _ = std::fs::remove_dir_all(&out);
}
