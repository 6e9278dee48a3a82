//! Streams whose model version is taken out of service under them (an admin unload, a
//! blue/green deploy), on in-process servers with two versions of Silero VAD: the stream is
//! handed over as at a shutdown (a last checkpoint marked `handover`, then close 1001 saying
//! why; without checkpoints the 1001 alone), never failed with 1011, and a resume from the
//! token on the same server ends with its summary, its `seq`s gapless: on the same version
//! exactly when the default is that version again (unloaded, it loads again), on the new
//! default from a fresh state when a rollout moved it. A stream on another model goes on
//! untouched; a gRPC sequence is handed over in the answer to its step. A stream whose client
//! is away when its version is retired hands over to the connection that resumes it.

use crate::common;

use std::time::Duration;

use common::grpc_sequence::{self, grpc_client, int, text, Call, Samples};
use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "retire-admin-token";

/// The bundled models with a second version of `silero_vad` (the same file): version 2 is the
/// default.
fn two_versions() -> std::path::PathBuf {
    let manifest = bundled_manifest();
    let at = manifest.find("name = \"silero_vad\"").unwrap();
    let block_start = manifest[..at].rfind("[[models]]").unwrap();
    let block_end = manifest[at..]
        .find("[[models]]")
        .map_or(manifest.len(), |n| at + n);
    let v2 = manifest[block_start..block_end].replace("version = \"1\"", "version = \"2\"");
    model_dir(&format!("{manifest}\n{v2}"))
}

fn server() -> streamserve::server::Running {
    start_running(&two_versions(), |config| {
        config.admin_token = Some(TOKEN.into());
        config.stream_checkpoint_ms = 500;
    })
}

/// An admin call that must succeed.
async fn admin(url: &str, path: &str, body: Value) -> Value {
    let response = client()
        .post(format!("{url}/admin/models/{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {answer}");
    answer
}

/// What one connection of a stream saw: every text message, and how it closed.
struct Seen {
    messages: Vec<Value>,
    close: Option<(CloseCode, String)>,
}

impl Seen {
    fn results(&self) -> Vec<Value> {
        let results = self.messages.iter().filter(|m| m.get("seq").is_some());
        results.cloned().collect()
    }

    fn last_seq(&self) -> Option<u64> {
        self.results()
            .iter()
            .filter_map(|m| m["seq"].as_u64())
            .max()
    }

    fn checkpoints(&self) -> Vec<&Value> {
        let checkpoints = self.messages.iter().filter(|m| m["type"] == "checkpoint");
        checkpoints.collect()
    }
}

/// Reads `ws` until it closes (or nothing came for `quiet`, then `close` is none).
async fn read<E: std::fmt::Debug>(
    ws: &mut (impl futures_util::Stream<Item = Result<Message, E>> + Unpin),
    seen: &mut Seen,
    quiet: Duration,
) {
    loop {
        match tokio::time::timeout(quiet, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                seen.messages.push(serde_json::from_str(&text).unwrap())
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                let frame = frame.expect("a close frame with a code");
                seen.close = Some((frame.code, frame.reason.to_string()));
                return;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("the connection broke: {e:?}"),
            Ok(None) | Err(_) => return,
        }
    }
}

/// The two phrases fixture (a voice activity stream's).
const PHRASES: &str = "two_phrases_16k";

/// A stream on `model` with `start` options: the first `secs` of `fixture`, read until quiet
/// (every chunk stepped); then `retire` runs; then the rest of the audio and `end`, read until
/// the close.
async fn stream_across<F: std::future::Future<Output = ()>>(
    url: &str,
    (model, fixture): (&str, &str),
    start: Value,
    secs: f64,
    retire: impl FnOnce() -> F,
) -> Seen {
    let (audio, rate) = fixture_pcm16(fixture);
    let mut ws = connect_to(url, model).await.unwrap();
    ws.send(Message::text(start.to_string())).await.unwrap();
    let split = (secs * f64::from(rate)) as usize * 2;
    for frame in audio[..split].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    let mut seen = Seen {
        messages: Vec::new(),
        close: None,
    };
    read(&mut ws, &mut seen, Duration::from_secs(1)).await;
    assert!(
        seen.close.is_none(),
        "closed before the retire: {:?}",
        seen.close
    );
    retire().await;
    // The retired version's router drains what it holds, then stops: a step sent after that.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Sent while the answers are read, as a live client does: the server may close before it
    // has read all of it (the rest then goes nowhere).
    let (mut sink, mut answers) = ws.split();
    let rest = audio[split..].to_vec();
    let sending = tokio::spawn(async move {
        for frame in rest.chunks(2048) {
            if sink.send(Message::binary(frame.to_vec())).await.is_err() {
                return;
            }
        }
        let _ = sink
            .send(Message::text(json!({"type": "end"}).to_string()))
            .await;
    });
    read(&mut answers, &mut seen, Duration::from_secs(10)).await;
    sending.abort();
    seen
}

/// Resumes a stream on `model` from `token` after `last_seq` and sends the audio of `fixture`
/// from where `started` says, then `end`: `started`, and everything after it.
async fn resume(
    url: &str,
    (model, fixture): (&str, &str),
    token: &str,
    last_seq: Option<u64>,
) -> (Value, Seen) {
    let (audio, _) = fixture_pcm16(fixture);
    let mut ws = connect_to(url, model).await.unwrap();
    let start = json!({"type": "start", "resume": token, "last_seq": last_seq});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let Some(Ok(Message::Text(text))) = ws.next().await else {
        panic!("no answer to the resume")
    };
    let started: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(started["type"], "started", "{started}");
    let from = started["samples_received"].as_u64().unwrap() as usize;
    let mut seen = Seen {
        messages: Vec::new(),
        close: None,
    };
    for frame in audio[from * 2..].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    read(&mut ws, &mut seen, Duration::from_secs(10)).await;
    (started, seen)
}

/// The handover: a last checkpoint marked so, at the last completed chunk, then 1001 with a
/// reason naming the retired version; never the 1011 of a failed stream.
fn handed_over<'a>(seen: &'a Seen, retired: &str) -> &'a Value {
    let (code, reason) = seen.close.clone().unwrap_or_else(|| {
        panic!(
            "no close: {:?}",
            seen.messages.iter().rev().take(3).collect::<Vec<_>>()
        )
    });
    assert_eq!(code, CloseCode::Away, "{reason}");
    assert!(
        reason.contains("taken out of service") && reason.contains(retired),
        "{reason}"
    );
    assert!(
        reason.contains("resume from the last checkpoint"),
        "{reason}"
    );
    let last = *seen.checkpoints().last().expect("checkpoints");
    assert_eq!(last["handover"], true, "{last}");
    let earlier = seen
        .checkpoints()
        .iter()
        .filter(|c| c["handover"] == true)
        .count();
    assert_eq!(earlier, 1, "one handover checkpoint");
    assert!(
        !seen.messages.iter().any(|m| m["type"] == "summary"),
        "the stream did not end here"
    );
    last
}

/// Every result once, `seq`s gapless from 0, the summary last.
fn gapless(results: &[Value]) {
    for (i, m) in results.iter().enumerate() {
        assert_eq!(m["seq"], i as u64, "gap or repeat at {i}: {m}");
    }
    assert_eq!(results.last().unwrap()["type"], "summary");
}

const EVENTS: &str = "events";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_unload_hands_the_stream_over_and_it_resumes_exactly_on_the_same_server() {
    let running = server();
    let url = format!("http://{}", running.addr);
    // What the stream gives uninterrupted.
    let start = json!({"type": "start", "checkpoints": true, "results": EVENTS});
    let reference = stream_across(
        &url,
        ("silero_vad", PHRASES),
        start.clone(),
        4.2,
        || async {},
    )
    .await;
    assert_eq!(reference.close.as_ref().unwrap().0, CloseCode::Normal);
    let want = reference.results();

    let seen = stream_across(&url, ("silero_vad", PHRASES), start, 4.2, || async {
        let answer = admin(&url, "silero_vad/unload", json!({"version": "2"})).await;
        assert_eq!(answer["unloaded"], true, "{answer}");
    })
    .await;
    let checkpoint = handed_over(&seen, "silero_vad:2");
    let token = checkpoint["token"].as_str().unwrap();
    let last_seq = seen.last_seq();
    assert_eq!(
        checkpoint["next_seq"].as_u64().unwrap(),
        last_seq.map_or(0, |s| s + 1),
        "results sent before stay sent; the checkpoint is after the last of them"
    );

    // The default is version 2 still (unloaded, it loads again): the stream goes on on it,
    // with its state, and gives exactly what it gives uninterrupted.
    let (started, after) = resume(&url, ("silero_vad", PHRASES), token, last_seq).await;
    assert_eq!(started["version"], "2", "{started}");
    assert!(started.get("fresh_state").is_none(), "{started}");
    assert_eq!(after.close.as_ref().unwrap().0, CloseCode::Normal);
    let mut results = seen.results();
    results.extend(after.results());
    gapless(&results);
    assert_eq!(results, want, "the same results as without the unload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blue_green_deploy_hands_streams_over_to_the_new_default_and_spares_other_models() {
    let running = server();
    let url = format!("http://{}", running.addr);
    // A stream on another model, open across the deploy.
    let mut other = connect_to(&url, "vad_energy").await.unwrap();
    let start = json!({"type": "start", "results": "all"});
    other.send(Message::text(start.to_string())).await.unwrap();
    let (audio, rate) = fixture_pcm16(PHRASES);
    let half = audio.len() / 2 / 2048 * 2048;
    for frame in audio[..half].chunks(2048) {
        other.send(Message::binary(frame.to_vec())).await.unwrap();
    }

    let start = json!({"type": "start", "checkpoints": true, "results": EVENTS});
    let seen = stream_across(&url, ("silero_vad", PHRASES), start, 4.2, || async {
        let answer = admin(
            &url,
            "silero_vad/deploy",
            json!({"version": "1", "strategy": "blue_green"}),
        )
        .await;
        assert_eq!(answer["to"], "1", "{answer}");
    })
    .await;
    let checkpoint = handed_over(&seen, "silero_vad:2");
    let token = checkpoint["token"].as_str().unwrap();
    let last_seq = seen.last_seq();

    // The stream goes on on the new default, from a fresh state, numbered after the client's.
    let (started, after) = resume(&url, ("silero_vad", PHRASES), token, last_seq).await;
    assert_eq!(started["version"], "1", "{started}");
    assert_eq!(started["fresh_state"], true, "{started}");
    assert_eq!(started["next_seq"], last_seq.map_or(0, |s| s + 1));
    assert_eq!(
        started["samples_received"], checkpoint["samples"],
        "the audio from the handover checkpoint on is sent again"
    );
    assert_eq!(after.close.as_ref().unwrap().0, CloseCode::Normal);
    let mut results = seen.results();
    results.extend(after.results());
    gapless(&results);
    let summary = results.last().unwrap();
    let duration = audio.len() as f64 / 2.0 / f64::from(rate);
    assert!(
        (summary["duration"].as_f64().unwrap() - duration).abs() < 0.05,
        "{summary}"
    );

    // The other model's stream never noticed.
    for frame in audio[half..].chunks(2048) {
        other.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    other
        .send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    let mut untouched = Seen {
        messages: Vec::new(),
        close: None,
    };
    read(&mut other, &mut untouched, Duration::from_secs(10)).await;
    assert_eq!(untouched.close.as_ref().unwrap().0, CloseCode::Normal);
    let results = untouched.results();
    gapless(&results);
    let chunks = results.iter().filter(|m| m["type"] == "vad").count();
    assert_eq!(
        results.last().unwrap()["chunks"],
        chunks as u64,
        "every chunk's result"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_retired_while_its_client_is_away_hands_over_when_it_resumes() {
    let running = server();
    let url = format!("http://{}", running.addr);
    let (audio, _) = fixture_pcm16(PHRASES);
    let mut ws = connect_to(&url, "silero_vad").await.unwrap();
    let start = json!({"type": "start", "checkpoints": true, "results": EVENTS});
    ws.send(Message::text(start.to_string())).await.unwrap();
    for frame in audio[..2 * 67200].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    let mut seen = Seen {
        messages: Vec::new(),
        close: None,
    };
    read(&mut ws, &mut seen, Duration::from_secs(1)).await;
    let started = seen.messages[0].clone();
    assert_eq!(started["version"], "2", "{started}");
    // The connection drops: the stream waits for its client, and no step of it runs while
    // the deploy takes its version out of service.
    drop(ws);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deploy = json!({"version": "1", "strategy": "blue_green"});
    admin(&url, "silero_vad/deploy", deploy).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The client comes back by its stream id, sends nothing, and is handed over at once.
    let mut ws = connect_to(&url, "silero_vad").await.unwrap();
    let id = &started["stream_id"];
    let start = json!({"type": "start", "stream_id": id, "last_seq": seen.last_seq()});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let mut back = Seen {
        messages: Vec::new(),
        close: None,
    };
    read(&mut ws, &mut back, Duration::from_secs(5)).await;
    assert_eq!(back.messages[0]["type"], "started", "{:?}", back.messages);
    assert_eq!(back.messages[0]["resumed"], true);
    let checkpoint = handed_over(&back, "silero_vad:2");
    let token = checkpoint["token"].as_str().unwrap();

    // Its token goes on on the new default, from a fresh state, to the summary.
    let (started, after) = resume(&url, ("silero_vad", PHRASES), token, seen.last_seq()).await;
    assert_eq!(started["version"], "1", "{started}");
    assert_eq!(started["fresh_state"], true, "{started}");
    assert_eq!(after.close.as_ref().unwrap().0, CloseCode::Normal);
    let mut results = seen.results();
    results.extend(back.results());
    results.extend(after.results());
    gapless(&results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retired_stage_model_hands_a_pipeline_over_and_it_resumes_from_a_fresh_state() {
    let running = server();
    let url = format!("http://{}", running.addr);
    let keyword = ("hey_marvin", "keyword_positive");
    // Without the gate, every stage steps on all the audio.
    let start = json!({"type": "start", "checkpoints": true, "gate": false});
    let seen = stream_across(&url, keyword, start, 6.0, || async {
        admin(&url, "ww_embedding/unload", json!({"version": "1"})).await;
    })
    .await;
    let checkpoint = handed_over(&seen, "ww_embedding:1");
    let token = checkpoint["token"].as_str().unwrap();
    let last_seq = seen.last_seq();
    // The stream's own version is served still, but its stages run their default versions
    // now (loaded again here), whose state the checkpoint's need not be: a fresh state.
    let (started, after) = resume(&url, keyword, token, last_seq).await;
    assert_eq!(started["version"], "1", "{started}");
    assert_eq!(started["fresh_state"], true, "{started}");
    assert_eq!(after.close.as_ref().unwrap().0, CloseCode::Normal);
    let mut results = seen.results();
    results.extend(after.results());
    gapless(&results);
    let summary = results.last().unwrap();
    assert!(summary["keywords"].as_u64().unwrap() >= 1, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_without_checkpoints_gets_the_1001_alone() {
    let running = server();
    let url = format!("http://{}", running.addr);
    let start = json!({"type": "start", "results": EVENTS});
    let seen = stream_across(&url, ("silero_vad", PHRASES), start, 2.0, || async {
        admin(&url, "silero_vad/unload", json!({"version": "2"})).await;
    })
    .await;
    let (code, reason) = seen.close.clone().expect("a close");
    assert_eq!(code, CloseCode::Away, "{reason}");
    assert!(reason.contains("taken out of service"), "{reason}");
    assert!(reason.contains("start the stream again"), "{reason}");
    assert!(seen.checkpoints().is_empty());
    // A new stream is served (the version loads again).
    let start = json!({"type": "start", "results": EVENTS});
    let again = stream_across(&url, ("silero_vad", PHRASES), start, 2.0, || async {}).await;
    assert_eq!(again.close.unwrap().0, CloseCode::Normal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_sequence_is_handed_over_in_its_step_and_resumes_on_the_default_version() {
    let running = server();
    let url = format!("http://{}", running.addr);
    let (pcm, _) = grpc_sequence::fixture();
    let mut c = grpc_client(&running).await;
    let mut call = Call::open(&mut c, None).await;
    // On version 1, by name: not the default.
    let on_v1 = |mut request: streamserve::api::grpc::proto::inference::ModelInferRequest| {
        request.model_version = "1".into();
        request
    };
    let checkpoints = [("checkpoints", ParameterChoice::BoolParam(true))];
    let steps: Vec<&[i16]> = pcm.chunks(4000).collect();
    let split = steps.len() / 2;
    // Every chunk's result (`results: all`, the default), so that each answer has some.
    let mut seqs = Vec::new();
    let mut last_seq = None;
    for (i, chunk) in steps[..split].iter().enumerate() {
        let options: &[_] = if i == 0 { &checkpoints } else { &[] };
        let step = grpc_sequence::step(3, i == 0, false, Samples::Pcm(chunk), options);
        let r = call.ok(on_v1(step)).await;
        if i == 0 {
            assert_eq!(r.model_version, "1");
        }
        seqs.extend(grpc_sequence::u64s(&r, "seq"));
        if r.parameters.contains_key("last_seq") {
            last_seq = Some(int(&r, "last_seq"));
        }
    }
    admin(&url, "silero_vad/unload", json!({"version": "1"})).await;
    // Its router drains what it holds, then stops.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The next step is answered with the handover (not an error: its outputs stand).
    let step = grpc_sequence::step(3, false, false, Samples::Pcm(steps[split]), &[]);
    let r = call.ok(step).await;
    assert!(matches!(
        r.parameters["handover"].parameter_choice,
        Some(ParameterChoice::BoolParam(true))
    ));
    let reason = text(&r, "handover_reason");
    assert!(reason.contains("taken out of service"), "{reason}");
    let token = text(&r, "checkpoint");
    let from = int(&r, "checkpoint_samples") as usize;
    seqs.extend(grpc_sequence::u64s(&r, "seq"));
    if r.parameters.contains_key("last_seq") {
        last_seq = Some(int(&r, "last_seq"));
    }
    // The sequence is over on this call: a further step is refused, saying how to go on.
    let step = grpc_sequence::step(3, false, false, Samples::Pcm(steps[split]), &[]);
    call.refused(step, "send sequence_start").await;

    // Resumed from the token: on the default version (2), from a fresh state.
    let mut resume = vec![("resume", ParameterChoice::StringParam(token))];
    if let Some(last) = last_seq {
        resume.push(("last_seq", ParameterChoice::Int64Param(last)));
    }
    let r = call
        .ok(grpc_sequence::step(3, true, false, Samples::None, &resume))
        .await;
    assert_eq!(r.model_version, "2");
    assert!(matches!(
        r.parameters["fresh_state"].parameter_choice,
        Some(ParameterChoice::BoolParam(true))
    ));
    assert_eq!(int(&r, "samples_received") as usize, from);
    assert_eq!(
        int(&r, "next_seq"),
        last_seq.map_or(0, |s| s + 1),
        "after the client's"
    );
    seqs.extend(grpc_sequence::u64s(&r, "seq"));
    let rest: Vec<&[i16]> = pcm[from..].chunks(4000).collect();
    let mut summarized = false;
    for (i, chunk) in rest.iter().enumerate() {
        let end = i + 1 == rest.len();
        let r = call
            .ok(grpc_sequence::step(3, false, end, Samples::Pcm(chunk), &[]))
            .await;
        seqs.extend(grpc_sequence::u64s(&r, "seq"));
        summarized |= r.parameters.contains_key("duration");
    }
    assert!(summarized, "the sequence ended with its summary");
    // Chunk results (speech events take the seqs between them): each once, in order.
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs.len() > 250, "every chunk's result: {}", seqs.len());
}
