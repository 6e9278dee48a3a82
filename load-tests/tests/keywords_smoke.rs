//! Smoke test of keyword-spotting stream load (`loadgen keywords-bench`'s streams) against a
//! real streamserve started in-process on 127.0.0.1 (a free port) with the real keyword
//! pipeline (`hey_marvin`, its stages and its gate, from the bundled manifest): 4 streams at
//! 4x real time for about two seconds with the gate off, then with it on. Behaviour only,
//! never timings.
//!
//! Needs libonnxruntime, which `streamserve::runtime::init` finds in the checkout's `.venv`
//! (installed by `bash scripts/setup.sh`).

use std::time::Duration;

use streamserve_load::bench::{self, TempModelDir};
use streamserve_load::keywords_bench::{self, KeywordsBenchOptions, MODEL, ON};
use streamserve_load::streams::{self, ResultsMode, StreamOptions};

#[test]
fn keyword_streams_against_a_real_server() {
    let defaults = streamserve_load::cli::defaults::<KeywordsBenchOptions>();
    let (manifest, _) = keywords_bench::pipeline_manifest(&defaults.manifest, &ON)
        .expect("the bundled manifest has the keyword pipeline");
    let parsed: toml::Table = toml::from_str(&manifest).unwrap();
    let max_batch = parsed["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str() == Some(MODEL))
        .and_then(|m| m["max_batch_size"].as_integer())
        .unwrap() as usize;
    let dir = TempModelDir::create("keywords-smoke", &manifest).unwrap();
    let running = bench::start_server_for(&dir.path, MODEL, max_batch)
        .expect("streamserve starts and serves hey_marvin");

    let audio = streams::load_audio(Some(&defaults.wav)).expect("the fixture loads");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut reports = Vec::new();
    for no_gate in [true, false] {
        let mut options = StreamOptions::new(format!("http://{}", running.addr), audio.clone());
        options.model = MODEL.into();
        options.streams = 4;
        options.ramp = Duration::from_millis(200);
        options.duration = Duration::from_millis(1800);
        options.speed = 4.0;
        options.results = ResultsMode::All;
        options.no_gate = no_gate;
        // Late senders are a timing matter: not asserted here.
        options.late_threshold = Duration::from_secs(60);
        let report = runtime
            .block_on(streams::run(&options))
            .expect("the stream run completes");
        reports.push((no_gate, report));
    }
    bench::stop_server(&running);

    for (no_gate, report) in reports {
        let summary = format!("gate off: {no_gate}\n{}", report.summary());
        // Every stream got `started`, `score` results with consecutive `seq` for the chunks
        // its `t` says, a `summary` and a close 1000; with the gate off a score for every
        // chunk once the head's window was full (with it on, none for the steps it skipped).
        assert_eq!(report.error_count(), 0, "errors:\n{summary}");
        assert_eq!(report.started, 4, "{summary}");
        assert_eq!(report.summaries, 4, "{summary}");
        assert_eq!(report.closes.get("1000"), Some(&4), "{summary}");
        assert_eq!(report.chunk_samples, 1280, "{summary}");
        // 4 streams x ~2 s x 4 x real time = ~32 s of audio, 12.5 scores a second after the
        // first 1.28 s of each stream.
        assert!(report.audio_seconds > 20.0, "{summary}");
        let most = (report.audio_seconds * 12.5).ceil() as u64;
        assert!(
            report.chunks_total > most / 2 && report.chunks_total <= most,
            "{summary}"
        );
        assert!(report.chunks_measured > 0, "{summary}");
    }
}
