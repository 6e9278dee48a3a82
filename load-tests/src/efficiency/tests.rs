//! Unit tests of `loadgen efficiency` without a server: per-unit figures from CPU shares and
//! `/metrics` deltas, the workers' threads, the defaults and the report's rows.

use super::*;

/// `/metrics` of both models at a window's two ends.
fn texts(requests: u64, rest_calls: u64, chunks: u64, vad_calls: u64) -> String {
    let (mlp, vad) = (
        "{model=\"mlp\",version=\"1\"",
        "{model=\"silero_vad\",version=\"1\"",
    );
    format!(
        "streamserve_requests_total{mlp},status=\"200\"}} {requests}\n\
         streamserve_requests_total{mlp},status=\"503\"}} 0\n\
         streamserve_batch_size_sum{mlp}}} {requests}\nstreamserve_batch_size_count{mlp}}} {rest_calls}\n\
         streamserve_stream_chunks_total{{model=\"silero_vad\"}} {chunks}\n\
         streamserve_batch_size_sum{vad}}} {chunks}\nstreamserve_batch_size_count{vad}}} {vad_calls}\n"
    )
}

fn window(case: &Case, seconds: f64, server_cores: f64) -> Window {
    let cores = [
        ("loadgen (client)", 0.4),
        ("server", server_cores),
        ("others", 0.02),
    ];
    let cores: Vec<(String, f64)> = cores.iter().map(|(l, c)| (l.to_string(), *c)).collect();
    let (before, after) = (texts(100, 100, 50, 10), texts(8100, 2100, 25050, 5010));
    // The model's workers took 0.1 core: 100 µs a request over 8 s, 16 µs a chunk over 4 s;
    // another thread's time does not count.
    let worker = format!("{}1-0", worker_threads(case.model));
    let ns = (0.1 * seconds * 1e9) as u64;
    let threads_before = [(7, worker.clone(), 1_000), (8, "actix-rt".into(), 0)];
    let threads_after = [(7, worker, 1_000 + ns), (8, "actix-rt".into(), 5 * ns)];
    let ends = ([&before[..], &after], [&threads_before[..], &threads_after]);
    Window::new(case, seconds, &cores, ends)
}

#[test]
fn rest_figures_per_request() {
    let case = Case::new(false, false, 32);
    // 1.0 core over 8 s = 8 CPU-s for 8000 requests: 1000 µs each; 8000 rows in 2000 calls.
    let w = window(&case, 8.0, 1.0);
    assert_eq!(
        (w.units, w.rows, w.calls, w.batch()),
        (8000.0, 8000.0, 2000.0, Some(4))
    );
    assert_eq!((w.cpu.loadgen_cores, w.cpu.other_cores), (0.4, 0.02));
    let f = w.figures(&case, Some(250.0));
    assert_eq!(
        (f.server_us_per_unit, f.rows_per_call, f.rows_per_unit),
        (1000.0, 4.0, 1.0)
    );
    assert_eq!(
        (f.server_over_model, f.plumbing_us),
        (Some(4.0), Some(750.0))
    );
    assert_eq!(f.streams_per_core, None);
    assert_eq!(w.figures(&case, None).server_over_model, None);
    // The workers took 100 µs a row in the server, whatever the model costs in-process.
    let (per_row, beside) = (f.worker_us_per_row.unwrap(), f.beside_workers_us.unwrap());
    assert!((per_row - 100.0).abs() < 1e-6 && (beside - 900.0).abs() < 1e-6);
    assert!((f.worker_over_model.unwrap() - 0.4).abs() < 1e-9);
    assert_eq!(w.figures(&case, None).worker_over_model, None);
}

#[test]
fn stream_figures_per_chunk_and_per_core() {
    let case = Case::new(true, false, 200);
    // 0.5 core over 4 s = 2 CPU-s for 25000 chunks: 80 µs each; 200 streams on 0.5 core.
    let f = window(&case, 4.0, 0.5).figures(&case, Some(40.0));
    assert_eq!((f.server_us_per_unit, f.rows_per_call), (80.0, 5.0));
    assert_eq!(
        (f.server_over_model, f.plumbing_us),
        (Some(2.0), Some(40.0))
    );
    assert_eq!(f.streams_per_core, Some(400.0));
    let (per_row, beside) = (f.worker_us_per_row.unwrap(), f.beside_workers_us.unwrap());
    assert!((per_row - 16.0).abs() < 1e-6 && (beside - 64.0).abs() < 1e-6);
    // Half the chunks: the streams kept half of real time, so 100 streams on 0.5 core.
    let behind = Window {
        units: 12_500.0,
        ..window(&case, 4.0, 0.5)
    };
    assert_eq!(behind.figures(&case, None).streams_per_core, Some(200.0));
    // No counters moved: no batch to measure, nothing divided by zero.
    let still = texts(1, 1, 1, 1);
    let empty = Window::new(&case, 4.0, &[], ([&still, &still], [&[], &[]]));
    assert_eq!(
        (empty.batch(), empty.figures(&case, None)),
        (None, Figures::default())
    );
}

#[test]
fn the_defaults_and_the_report() {
    let options = crate::cli::defaults::<EfficiencyOptions>();
    assert_eq!(
        (&options.concurrency[..], &options.streams[..]),
        (&[1, 32][..], &[100, 200][..])
    );
    assert_eq!(options.plumbing_streams, 200);
    let plumbing = Case::plumbing(200);
    assert_eq!(
        (
            plumbing.model,
            plumbing.unit,
            plumbing.streams,
            &plumbing.label[..]
        ),
        (ENERGY, "chunk", true, "200 streams, vad_energy")
    );
    assert_eq!(options.client_threads(), 1);
    let names = [MLP, VAD, ENERGY].map(worker_threads);
    assert_eq!(names, ["worker-mlp-", "worker-silero_v", "worker-vad_ener"]);
    let case = Case::new(true, false, 200);
    let w = window(&case, 4.0, 0.5);
    let cost = ModelCost {
        model: VAD,
        batch: 5,
        calls: 9,
        us_per_call: 200.0,
        us_per_row: 40.0,
    };
    let load = json!({});
    let seen = Seen {
        per_s: 6250.0,
        p50_ms: 3.0,
        p99_ms: 9.0,
        errors: 2,
        client_units: 25000,
        load,
    };
    let (figures, model_cost) = (Some(w.figures(&case, Some(40.0))), Some(cost.clone()));
    let result = CaseResult {
        case,
        seen,
        window: Some(w),
        model_cost,
        figures,
    };
    let start = crate::report::Start::now(Some(Path::new("/nonexistent")), "test");
    let json = json!({ "started_at": "t", "command": "c", "machine": start.machine, "server_bin": "s",
        "server_command": "x", "pinned": { "server_cpu": 0, "loadgen_cpu": 1 }, "client_threads": 1, "duration_s": 4.0, "warmup_s": 1.0,
        "ramp_s": 2.0, "ceiling_s": 2.0, "quiet_wait_s": 0.0, "manifest": "m", "wav": "w", "audio_s": 16.0,
        "cases": [result], "model_costs": [cost], "contended": false, "quiet_cores": 0.15, "contended_cores": 0.25 });
    let header = crate::report::header("", Duration::from_secs(1), &[], false);
    let md =
        crate::report::render("efficiency", &crate::report::context(&json, &[header])).unwrap();
    let row = "| 200 streams | 6250 chunks/s | 3.00 / 9.00 ms | 0.50 | **80 µs** per chunk | 5.0 | **40.0 µs** (5) | 2.00× | 40 µs | **400** |";
    let in_server = "| 200 streams | 5.0 | 40.0 µs (5) | **16.0 µs** | 0.40× | 64 µs |";
    for want in [
        row,
        in_server,
        "**Errors** in 200 streams",
        "server pinned to CPU 0, load generator to CPU 1",
    ] {
        assert!(md.contains(want), "{want:?} is not in:\n{md}");
    }
}
