//! Keyword-spotting streams over real sockets: the bundled `hey_marvin` spotter, three ONNX
//! models chained by its manifest declaration (mel frames -> speech embeddings -> a score)
//! and gated by Silero VAD, on espeak-ng speech with the phrase at known times
//! (tests/audio/keyword_*.{wav,json}, made by scripts/make_wakeword.py, which also wrote the
//! events its Python reference of the same pipeline gives on them), over WebSocket and over
//! gRPC sequences. What the gate saves is
//! counted in tests/keyword_gate.rs, a test binary of its own so that its metrics are its own.

mod common;

use std::path::Path;
use std::time::Duration;

use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SPOTTER: &str = "hey_marvin";

fn truth(name: &str) -> Value {
    let path = repo().join(format!("tests/audio/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The gate's stream (the model's default).
fn gated() -> Value {
    json!({})
}

/// Every stage on all the audio: a score every 80 ms.
fn ungated() -> Value {
    json!({"gate": false})
}

async fn alone(url: &str, name: &str, frame_bytes: usize, options: Value) -> Run {
    let (audio, rate) = fixture_pcm16(name);
    let urls = [url.to_string()];
    let run = stream_resumable_to(
        (SPOTTER, &options),
        &urls,
        &audio,
        rate,
        frame_bytes,
        Duration::ZERO,
        0,
    )
    .await;
    assert!(matches!(run.ends[..], [Ended::Done]), "{:?}", run.ends);
    assert!(run.out_of_order.is_empty(), "{:?}", run.out_of_order);
    run
}

fn of_type<'a>(run: &'a Run, kind: &str) -> Vec<&'a Value> {
    run.results.iter().filter(|m| m["type"] == kind).collect()
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyword_events_come_at_the_phrase_and_never_on_other_speech() {
    let url = bundled();
    let run = alone(url, "keyword_positive", 3200, ungated()).await;
    let truth = truth("keyword_positive");
    let phrases = truth["keywords"].as_array().unwrap();
    let events = of_type(&run, "keyword");
    assert_eq!(
        events.len(),
        phrases.len(),
        "one event per phrase: {events:?}"
    );
    for (event, phrase) in events.iter().zip(phrases) {
        let (t, end) = (f64_of(&event["t"]), f64_of(&phrase[1]));
        assert!(
            (end - 0.3..=end + 1.0).contains(&t),
            "event at {t} s for the phrase ending at {end} s"
        );
        assert_eq!(event["phrase"], "hey marvin");
    }
    // The same events, at the same audio times, as the Python reference of the pipeline.
    let expected = truth["expected_events"].as_array().unwrap();
    assert_eq!(events.len(), expected.len());
    for (got, want) in events.iter().zip(expected) {
        assert!(
            (f64_of(&got["t"]) - f64_of(&want["t"])).abs() < 1e-6,
            "{got} vs {want}"
        );
        assert!(
            (f64_of(&got["score"]) - f64_of(&want["score"])).abs() < 1e-3,
            "{got} vs {want}"
        );
    }
    // A score per 80 ms step once the spotter has its 16 embeddings.
    let scores = of_type(&run, "score");
    let duration = f64_of(&truth["duration"]);
    assert!(
        scores.len() as f64 >= (duration / 0.08).floor() - 16.0,
        "{} scores",
        scores.len()
    );
    let summary = run.summary().expect("a summary");
    assert_eq!(summary["keywords"], phrases.len());
    assert_eq!(summary["segments"], json!([]));

    for options in [ungated(), gated()] {
        let run = alone(url, "keyword_negative", 3200, options).await;
        assert!(
            of_type(&run, "keyword").is_empty(),
            "{:?}",
            of_type(&run, "keyword")
        );
        assert_eq!(run.summary().unwrap()["keywords"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gated_spotter_finds_what_the_spotter_alone_finds_with_the_same_scores() {
    let url = bundled();
    let all = alone(url, "keyword_positive", 3200, ungated()).await;
    let run = alone(url, "keyword_positive", 3200, gated()).await;
    let events = |run: &Run| -> Vec<(f64, f64)> {
        of_type(run, "keyword")
            .iter()
            .map(|e| (f64_of(&e["t"]), f64_of(&e["score"])))
            .collect()
    };
    assert_eq!(events(&run), events(&all));
    assert_eq!(events(&run).len(), 2);
    // Around speech the gated stream scores exactly as the ungated one; away from it (the
    // silence after the last sentence) it does not score at all.
    let all_scores: Vec<(f64, f64)> = of_type(&all, "score")
        .iter()
        .map(|e| (f64_of(&e["t"]), f64_of(&e["score"])))
        .collect();
    let scores = of_type(&run, "score");
    for score in &scores {
        let (t, value) = (f64_of(&score["t"]), f64_of(&score["score"]));
        assert!(
            all_scores.contains(&(t, value)),
            "{score} is not the ungated score at {t} s"
        );
    }
    assert!(
        scores.len() < all_scores.len(),
        "{} of {}",
        scores.len(),
        all_scores.len()
    );
    let speech = truth("keyword_positive")["speech"]
        .as_array()
        .unwrap()
        .clone();
    let last_speech = f64_of(&speech.last().unwrap()[1]);
    for (t, _) in &all_scores {
        let near_speech = speech
            .iter()
            .any(|s| f64_of(&s[0]) <= *t && *t <= f64_of(&s[1]) + 0.5);
        if near_speech {
            assert!(
                scores.iter().any(|s| f64_of(&s["t"]) == *t),
                "no gated score at {t} s, within speech"
            );
        }
    }
    assert!(
        scores.iter().all(|s| f64_of(&s["t"]) < last_speech + 1.6),
        "a score long after the last speech at {last_speech} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_streams_get_what_each_gets_alone_batched_per_stage() {
    let url = start(&repo().join("models"), |_| {});
    let want = alone(&url, "keyword_positive", 3200, gated()).await;
    let (audio, rate) = fixture_pcm16("keyword_positive");
    let runs = futures_util::future::join_all((0..20).map(|i| {
        let (url, audio) = (url.clone(), audio.clone());
        async move {
            // Frames of different sizes: the streams' steps fall due at different times.
            let frame = 1000 + 64 * i;
            let options = gated();
            stream_resumable_to(
                (SPOTTER, &options),
                &[url],
                &audio,
                rate,
                frame,
                Duration::ZERO,
                0,
            )
            .await
        }
    }))
    .await;
    for run in &runs {
        assert!(run.out_of_order.is_empty(), "{:?}", run.out_of_order);
        assert_eq!(run.results.len(), want.results.len());
        for (got, alone) in run.results.iter().zip(&want.results) {
            assert_eq!(got["type"], alone["type"]);
            assert_eq!(got["t"], alone["t"]);
            for field in ["score", "keywords"] {
                if let (Some(a), Some(b)) = (got[field].as_f64(), alone[field].as_f64()) {
                    assert!((a - b).abs() < 1e-5, "{got} vs {alone}");
                }
            }
        }
    }
    let metrics = metrics_text(&client(), &url).await;
    let steps = |stage: &str| {
        let series = format!(
            "streamserve_stream_stage_steps_total{{model=\"{SPOTTER}\",stage=\"{stage}\"}}"
        );
        sample(&metrics, &series).unwrap_or_else(|| panic!("no {series}"))
    };
    // (The servers of this test binary share one metrics recorder: other tests' streams
    // count too, hence at least.)
    let scores = of_type(&want, "score").len() as f64;
    assert!(
        steps(SPOTTER) >= 21.0 * scores,
        "one spotter step per score"
    );
    assert!(steps("ww_embedding") >= steps(SPOTTER));
    // Steps of different streams shared model calls: fewer calls than steps.
    let calls = sample(
        &metrics,
        "streamserve_batch_size_count{model=\"ww_embedding\",version=\"1\"}",
    )
    .expect("the embedding model's batch sizes");
    assert!(
        calls < steps("ww_embedding"),
        "{calls} calls for {} steps",
        steps("ww_embedding")
    );
}

const KEY: &str = "0123456789abcdef0123456789abcdef-keyword-key";

fn keyed_server(keys: &Path) -> String {
    let keys = keys.to_path_buf();
    start(&repo().join("models"), move |config| {
        config.stream_token_keys = Some(keys);
        config.stream_checkpoint_ms = 500;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyword_stream_resumes_on_another_instance_with_every_stage_intact() {
    let keys = common::fleet::temp_dir("keyword-keys").join("keys");
    std::fs::write(&keys, KEY).unwrap();
    let (a, b) = (keyed_server(&keys), keyed_server(&keys));
    let want = alone(&a, "keyword_positive", 3200, gated()).await;
    let (audio, rate) = fixture_pcm16("keyword_positive");

    // Half the audio on A, then the socket drops after a checkpoint.
    let mut ws = connect_to(&a, SPOTTER).await.unwrap();
    let start = json!({"type": "start", "sample_rate": rate, "checkpoints": true});
    ws.send(Message::text(start.to_string())).await.unwrap();
    for frame in audio[..audio.len() / 2].chunks(3200) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    let (mut results, mut checkpoint, mut seen) = (Vec::new(), Value::Null, 0);
    while seen < 3 {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("the stream ended early")
        };
        let m: Value = serde_json::from_str(&text).unwrap();
        match m["type"].as_str() {
            Some("checkpoint") => {
                seen += 1;
                checkpoint = m;
            }
            Some("started") => {}
            _ => results.push(m),
        }
    }
    drop(ws);

    // B never saw the stream: it goes on from the token, every stage's buffer with it.
    let token = checkpoint["token"].as_str().unwrap();
    // Every stage's buffer and the gate's fit a start message (64 KiB) with room to spare.
    assert!(
        token.len() < 48 * 1024,
        "a token of {} characters",
        token.len()
    );
    let last_seq = results.last().unwrap()["seq"].as_u64().unwrap();
    let mut ws = connect_to(&b, SPOTTER).await.unwrap();
    let resume = json!({"type": "start", "resume": token, "last_seq": last_seq});
    ws.send(Message::text(resume.to_string())).await.unwrap();
    let Some(Ok(Message::Text(text))) = ws.next().await else {
        panic!("no answer")
    };
    let started: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(started["resumed"], true, "{started}");
    let from = started["samples_received"].as_u64().unwrap() as usize * 2;
    results.extend(send_rest_and_results(&mut ws, &audio[from..], 3200).await);
    assert_eq!(results.len(), want.results.len(), "as many results");
    for (i, (got, alone)) in results.iter().zip(&want.results).enumerate() {
        assert_eq!(got["seq"], i as u64, "gap or repeat at {i}: {got}");
        assert_eq!(got, alone, "the same result, to the last digit");
    }
}

/// Opens a stream on `model`, sends `start`, and returns the close frame.
async fn refused(url: &str, model: &str, start: Value) -> (CloseCode, String) {
    let mut ws = connect_to(url, model).await.unwrap();
    ws.send(Message::text(start.to_string())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(Some(frame)))) => return (frame.code, frame.reason.to_string()),
            Some(Ok(Message::Text(text))) => assert!(!text.contains("\"started\""), "{text}"),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_keyword_starts_are_refused_with_reasons_while_a_good_stream_carries_on() {
    let url = start(&repo().join("models"), |_| {});
    let good = {
        let url = url.clone();
        tokio::spawn(async move { alone(&url, "keyword_positive", 640, gated()).await })
    };
    for (start, code, reason) in [
        (
            json!({"type": "start", "keyword": {"threshold": 0}}),
            CloseCode::Policy,
            "keyword.threshold must be in (0, 1], got 0",
        ),
        (
            json!({"type": "start", "keyword": {"refractory_ms": 90000}}),
            CloseCode::Policy,
            "keyword.refractory_ms must be at most 60000",
        ),
        (
            json!({"type": "start", "keyword": {"treshold": 0.5}}),
            CloseCode::Invalid,
            "unknown field `treshold`",
        ),
        (
            json!({"type": "start", "sample_rate": 8000}),
            CloseCode::Policy,
            "sample_rate must be 16000, got 8000",
        ),
        (
            json!({"type": "start", "gate": "off"}),
            CloseCode::Invalid,
            "invalid type: string \"off\", expected a boolean",
        ),
        // Options of the other kind of stream are refused, not ignored.
        (
            json!({"type": "start", "vad": {"min_speech_ms": 100}}),
            CloseCode::Policy,
            "`vad` options do not apply to this model's streams (a keyword stream)",
        ),
    ] {
        let (got_code, got_reason) = refused(&url, SPOTTER, start.clone()).await;
        assert_eq!(got_code, code, "{start}: {got_reason}");
        assert!(got_reason.contains(reason), "{start}: {got_reason}");
    }
    let keyword = json!({"type": "start", "keyword": {"threshold": 0.5}});
    let (code, reason) = refused(&url, "silero_vad", keyword).await;
    assert_eq!(code, CloseCode::Policy, "{reason}");
    assert!(
        reason.contains(
            "`keyword` options do not apply to this model's streams (a voice activity stream)"
        ),
        "{reason}"
    );
    // A stage's model is not a stream; nor is the spotter a voice activity model.
    let c = client();
    let ws_url = format!(
        "{}/v1/streams/ww_embedding",
        url.replace("http://", "ws://")
    );
    let err = tokio_tungstenite::connect_async(ws_url)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("400"), "{err}");
    let (status, body) = post(
        &c,
        &format!("{url}/v1/models/{SPOTTER}/segments"),
        &json!({}),
    )
    .await;
    expect((status, body), 400, "not a voice activity model");

    let run = good.await.unwrap();
    assert_eq!(
        of_type(&run, "keyword").len(),
        truth("keyword_positive")["keywords"]
            .as_array()
            .unwrap()
            .len()
    );
}

/// A keyword stream's answers over gRPC, gathered: (seq, t, score) of every score and (t, score)
/// of every keyword event, and the summary's count.
#[derive(Debug, Default, PartialEq)]
struct Heard {
    scores: Vec<(u64, f64, f32)>,
    keywords: Vec<(f64, f32)>,
    total: Option<i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyword_sequence_over_grpc_gives_the_websocket_streams_results() {
    use common::grpc_sequence::*;
    use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;

    let running = start_running(&repo().join("models"), |_| {});
    let url = format!("http://{}", running.addr);
    let ws = alone(&url, "keyword_positive", 3200, ungated()).await;
    let mut want = Heard::default();
    for m in &ws.results {
        let score = || (f64_of(&m["t"]), f64_of(&m["score"]) as f32);
        match m["type"].as_str().unwrap() {
            "score" => {
                let (t, score) = score();
                want.scores.push((m["seq"].as_u64().unwrap(), t, score))
            }
            "keyword" => want.keywords.push(score()),
            _ => {}
        }
    }
    want.total = Some(2);

    let (bytes, _) = fixture_pcm16("keyword_positive");
    let pcm: Vec<i16> = bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    let steps: Vec<&[i16]> = pcm.chunks(4000).collect();
    let mut c = grpc_client(&running).await;
    let (tx, mut answers) = call(&mut c).await;
    let options = [("gate", ParameterChoice::BoolParam(false))];
    let mut got = Heard::default();
    for i in 0..=steps.len() {
        let audio = steps.get(i).map_or(Samples::None, |s| Samples::Pcm(s));
        let parameters: &[_] = if i == 0 { &options } else { &[] };
        let request = step_on(SPOTTER, 3, i == 0, i == steps.len(), audio, parameters);
        tx.send(request).await.unwrap();
        let r = ok(&mut answers).await;
        let (seq, t, score) = (u64s(&r, "seq"), f64s(&r, "t"), f32s(&r, "score"));
        got.scores
            .extend((0..seq.len()).map(|k| (seq[k], t[k], score[k])));
        let (kt, ks) = (f64s(&r, "keyword_t"), f32s(&r, "keyword_score"));
        if !kt.is_empty() {
            assert_eq!(text(&r, "phrase"), "hey marvin");
        }
        got.keywords.extend(kt.into_iter().zip(ks));
        assert!(r.outputs.iter().all(|o| o.name != "probability"));
        if r.parameters.contains_key("keywords") {
            got.total = Some(int(&r, "keywords"));
        }
    }
    assert_eq!(
        got, want,
        "the same scores and keywords as the WebSocket stream"
    );

    // Keyword options are checked as the WebSocket start's are; a misspelt one is named.
    for (id, (key, value, reason)) in (4..).zip([
        (
            "keyword_threshold",
            ParameterChoice::DoubleParam(2.0),
            "keyword.threshold must be in (0, 1], got 2",
        ),
        (
            "keyword_treshold",
            ParameterChoice::DoubleParam(0.5),
            "parameter 'keyword_treshold' is not a stream option",
        ),
        (
            "gate",
            ParameterChoice::StringParam("off".into()),
            "expected a boolean",
        ),
        (
            "min_speech_ms",
            ParameterChoice::Int64Param(100),
            "`vad` options do not apply",
        ),
    ]) {
        let request = step_on(SPOTTER, id, true, true, Samples::None, &[(key, value)]);
        tx.send(request).await.unwrap();
        let a = answer(&mut answers).await;
        assert!(a.error_message.contains(reason), "{key}: {a:?}");
    }
}
