//! Smoke test of the stream load generator against a real streamserve started in-process on
//! 127.0.0.1 (a free port) with the real `silero_vad` model: 8 streams at 4x real time for
//! about two seconds. Behaviour only, never timings.
//!
//! Needs libonnxruntime, which `streamserve::runtime::init` finds in the checkout's `.venv`
//! (installed by `bash scripts/setup.sh`).

use std::time::Duration;

use streamserve_load::bench::{self, TempModelDir};
use streamserve_load::streams::{self, ResultsMode, StreamOptions};
use streamserve_load::streams_bench::{self, StreamsBenchOptions, VadSetup};

#[test]
fn streams_against_a_real_server() {
    let setup = VadSetup::batching_on();
    let (manifest, _) = streams_bench::vad_manifest(
        &streamserve_load::cli::defaults::<StreamsBenchOptions>().manifest,
        &setup,
    )
    .expect("the bundled manifest has silero_vad");
    let dir = TempModelDir::create("streams-smoke", &manifest).unwrap();
    let running = bench::start_server_for(&dir.path, streams_bench::MODEL, setup.max_batch_size)
        .expect("streamserve starts and serves silero_vad");

    let audio = streams::load_audio(None).expect("the fixture loads");
    let mut options = StreamOptions::new(format!("http://{}", running.addr), audio);
    options.streams = 8;
    options.ramp = Duration::from_millis(200);
    options.duration = Duration::from_millis(1800);
    options.speed = 4.0;
    options.frame_ms = 20;
    options.results = ResultsMode::All;
    // Late senders are a timing matter: not asserted here.
    options.late_threshold = Duration::from_secs(60);
    let report = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(streams::run(&options))
        .expect("the stream run completes");
    bench::stop_server(&running);

    let summary = report.summary();
    assert_eq!(report.error_count(), 0, "errors:\n{summary}");
    assert!(report.first_errors.is_empty(), "{summary}");
    // Every stream got `started`, a `summary` and a normal close. `read_results` counts a seq
    // that is not the previous + 1, a vad whose `t` is not 512k/16000, a vad count or summary
    // chunk count that does not match the audio sent, as errors: none happened.
    assert_eq!(report.connected, 8, "{summary}");
    assert_eq!(report.started, 8, "{summary}");
    assert_eq!(report.summaries, 8, "{summary}");
    assert_eq!(report.closes.get("1000"), Some(&8), "{summary}");
    assert_eq!(report.chunk_samples, 512, "{summary}");
    // 8 streams x ~2 s x 4 x real time = ~64 s of audio, ~2000 chunks, all answered.
    assert!(report.audio_seconds > 30.0, "{summary}");
    let sent_chunks = (report.audio_seconds * 16000.0 / 512.0).floor() as u64;
    assert!(report.chunks_total >= sent_chunks, "{summary}");
    assert!(report.chunks_measured > 0, "{summary}");
    assert_eq!(report.latency_us.len(), report.chunks_measured, "{summary}");
    // The fixture holds speech: the VAD announced some.
    assert!(report.events > 0, "{summary}");
    assert_eq!(report.degraded, 0, "{summary}");
}

#[test]
fn non_loopback_stream_targets_are_refused() {
    let audio = streams::load_audio(None).unwrap();
    for url in ["http://192.0.2.1:8080", "http://localhost:8080"] {
        let options = StreamOptions::new(url, audio.clone());
        assert!(options.endpoint().is_err(), "{url} was accepted");
    }
}
