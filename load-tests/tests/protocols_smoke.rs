//! Smoke test of `loadgen protocols` against a real streamserve started in-process (the real
//! `mlp` model, REST and gRPC listeners on free loopback ports): a shortened run, every client
//! at two levels; behaviour only (answers all OK and checked, files written), never timings.
//!
//! Needs libonnxruntime, which `streamserve::runtime::init` finds in the checkout's `.venv`
//! (installed by `bash scripts/setup.sh`).

use std::time::Duration;

use streamserve_load::protocols::{self, ProtocolsOptions};

#[test]
fn every_client_gets_checked_answers_from_one_server() {
    let out = std::env::temp_dir().join(format!("protocols-smoke-{}", std::process::id()));
    let mut options = ProtocolsOptions {
        concurrencies: vec![1, 5],
        rounds: 1,
        duration: Duration::from_millis(600),
        warmup: Duration::from_millis(200),
        // 5 requests in flight over 3 streams (2 + 2 + 1), on 2 connections.
        stream_window: 2,
        grpc_connections: 2,
        ..ProtocolsOptions::default()
    };
    options.mlp.request_timeout = Duration::from_secs(10);
    options.mlp.common.out = Some(out.clone());
    options.mlp.common.quiet_wait = Duration::ZERO;
    options.mlp.common.threads.client_threads = Some(2);
    let outcome = protocols::run(&options).expect("the protocols run completes");

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["kind"], "protocols");
    let levels = results["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for level in levels {
        let runs = level["runs"].as_array().unwrap();
        let keys: Vec<&str> = runs
            .iter()
            .map(|r| r["protocol"].as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            ["rest-json", "rest-binary", "grpc-unary", "grpc-stream"]
        );
        for run in runs {
            let what = format!("{} at c={}: {run}", run["protocol"], level["concurrency"]);
            assert!(run["ok"].as_u64().unwrap() > 0, "no success: {what}");
            assert_eq!(run["errors"], serde_json::json!({}), "{what}");
            assert_eq!(run["warmup_errors"], 0, "{what}");
            assert!(run["first_error"].is_null(), "{what}");
            // Every answer came back through the server's batcher, which says so.
            let batch = run["server_reported"]["mean_batch_rows"].as_f64().unwrap();
            assert!((1.0..=64.0).contains(&batch), "mean batch {batch}: {what}");
            assert!(
                run["ratios"]["throughput"].as_f64().unwrap() > 0.0,
                "{what}"
            );
        }
    }
    assert!(outcome.report.contains("## Ratios to REST JSON"));
    assert!(outcome.report.contains("gRPC stream"));
    assert!(out.join(protocols::PLOT_FILE).is_file());
    let _ = std::fs::remove_dir_all(&out);
}
