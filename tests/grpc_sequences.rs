//! Speech streams over gRPC with Triton's sequence conventions (`sequence_id`,
//! `sequence_start`, `sequence_end` on `ModelStreamInfer`), with a tonic client over a real
//! socket against the real server on the bundled Silero VAD. A sequence must give exactly
//! what a WebSocket stream of the same audio gives (the same probabilities, events and
//! segments); it resumes on a new call from its stream id, and on another instance from its
//! checkpoint after a shutdown handed it over; bad steps get their reasons while a good
//! sequence on the same call carries on.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::grpc_sequence::*;
use common::stream_client::*;
use common::*;
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use streamserve::api::grpc::proto::inference::*;
use tonic::Code;

const KEYS: &str = "a-fleet-wide-stream-token-key-for-grpc-sequences\n";

fn keys_file() -> PathBuf {
    let path = common::fleet::temp_dir("grpc-stream-keys").join("keys");
    std::fs::write(&path, KEYS).unwrap();
    path
}

fn server(tweak: impl FnOnce(&mut streamserve::config::Config)) -> streamserve::server::Running {
    start_running(&repo().join("models"), tweak)
}

/// One step of sequence `id` on silero_vad, with extra `parameters`.
fn step(
    id: i64,
    start: bool,
    end: bool,
    audio: Samples,
    parameters: &[(&str, ParameterChoice)],
) -> ModelInferRequest {
    step_on("silero_vad", id, start, end, audio, parameters)
}

/// What a sequence gave, gathered over its answers.
#[derive(Debug, Default, PartialEq)]
struct Results {
    /// (seq, t, probability) of every chunk.
    vad: Vec<(u64, f64, f32)>,
    speech_start: Vec<f64>,
    speech_end: Vec<f64>,
    segments: Vec<f64>,
}

impl Results {
    fn add(&mut self, r: &ModelInferResponse) {
        let (seq, t, probability) = (u64s(r, "seq"), f64s(r, "t"), f32s(r, "probability"));
        assert!(seq.len() == t.len() && t.len() == probability.len());
        for i in 0..seq.len() {
            self.vad.push((seq[i], t[i], probability[i]));
        }
        self.speech_start.extend(f64s(r, "speech_start"));
        self.speech_end.extend(f64s(r, "speech_end"));
        if r.outputs.iter().any(|o| o.name == "segments") {
            self.segments = f64s(r, "segments");
        }
    }

    /// The same from a WebSocket stream's messages.
    fn of_websocket(run: &Run) -> Results {
        let mut results = Results::default();
        for m in &run.results {
            let t = m["t"].as_f64();
            match m["type"].as_str().unwrap() {
                "vad" => results.vad.push((
                    m["seq"].as_u64().unwrap(),
                    t.unwrap(),
                    m["probability"].as_f64().unwrap() as f32,
                )),
                "speech_start" => results.speech_start.push(t.unwrap()),
                "speech_end" => results.speech_end.push(t.unwrap()),
                "summary" => {
                    for s in m["segments"].as_array().unwrap() {
                        results.segments.push(s["start"].as_f64().unwrap());
                        results.segments.push(s["end"].as_f64().unwrap());
                    }
                }
                _ => {}
            }
        }
        results
    }
}

fn fixture() -> (Vec<i16>, u32) {
    let (bytes, rate) = fixture_pcm16("two_phrases_16k");
    let pcm = bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    (pcm, rate)
}

/// The WebSocket stream's results for the fixture, on `running`.
async fn websocket_reference(running: &streamserve::server::Running) -> Results {
    let (bytes, rate) = fixture_pcm16("two_phrases_16k");
    let url = format!("http://{}", running.addr);
    let run = stream_resumable(&[url], &bytes, rate, 2048, Duration::ZERO, 0).await;
    assert!(matches!(run.ends[..], [Ended::Done]), "{:?}", run.ends);
    Results::of_websocket(&run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sequences_on_one_call_give_what_a_websocket_stream_gives() {
    let running = server(|_| {});
    let want = websocket_reference(&running).await;
    assert!(want.speech_start.len() >= 2 && want.vad.len() > 200);
    let (pcm, _) = fixture();
    let floats: Vec<f32> = pcm.iter().map(|&s| f32::from(s) / 32768.0).collect();
    let mut c = grpc_client(&running).await;
    let (tx, mut answers) = call(&mut c).await;
    // Sequence 7 sends INT16 in raw contents, 2,048 samples a step; sequence 8 FP32 in typed
    // contents, 3,000 a step (chunks straddle steps); their steps interleave on one call.
    let pcm_steps: Vec<&[i16]> = pcm.chunks(2048).collect();
    let float_steps: Vec<&[f32]> = floats.chunks(3000).collect();
    let (mut a, mut b) = (Results::default(), Results::default());
    let steps = pcm_steps.len().max(float_steps.len());
    for i in 0..=steps {
        let mut sent = Vec::new();
        if i <= pcm_steps.len() {
            let audio = pcm_steps.get(i).map_or(Samples::None, |s| Samples::Pcm(s));
            tx.send(step(7, i == 0, i == pcm_steps.len(), audio, &[]))
                .await
                .unwrap();
            sent.push(7);
        }
        if i <= float_steps.len() {
            let audio = float_steps
                .get(i)
                .map_or(Samples::None, |s| Samples::Float(s));
            tx.send(step(8, i == 0, i == float_steps.len(), audio, &[]))
                .await
                .unwrap();
            sent.push(8);
        }
        for id in sent {
            let r = ok(&mut answers).await;
            assert_eq!(r.model_name, "silero_vad");
            assert_eq!(r.model_version, "1", "every answer names its version");
            assert_eq!(int(&r, "sequence_id"), id, "answers come in request order");
            if i == 0 {
                assert_eq!(text(&r, "stream_id").len(), 32);
                assert_eq!(int(&r, "chunk_samples"), 512);
            }
            if id == 7 {
                a.add(&r)
            } else {
                b.add(&r)
            }
        }
    }
    drop(tx);
    assert!(answers.message().await.unwrap().is_none(), "the call ends");
    assert_eq!(a, want, "INT16 steps give the WebSocket stream's results");
    assert_eq!(b, want, "FP32 steps give the WebSocket stream's results");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequence_resumes_on_a_new_call_from_its_stream_id() {
    let running = server(|_| {});
    let want = websocket_reference(&running).await;
    let (pcm, _) = fixture();
    let half = pcm.len() / 2;
    let mut c = grpc_client(&running).await;
    let (tx, mut answers) = call(&mut c).await;
    let mut got = Results::default();
    let (mut stream_id, mut last_seq) = (String::new(), -1);
    for (i, chunk) in pcm[..half].chunks(4096).enumerate() {
        tx.send(step(3, i == 0, false, Samples::Pcm(chunk), &[]))
            .await
            .unwrap();
        let r = ok(&mut answers).await;
        if i == 0 {
            stream_id = text(&r, "stream_id");
        }
        if r.parameters.contains_key("last_seq") {
            last_seq = int(&r, "last_seq");
        }
        got.add(&r);
    }
    // The call breaks off without sequence_end: the stream waits for a resume.
    drop((tx, answers));

    let (tx, mut answers) = call(&mut c).await;
    let resume = [
        ("stream_id", ParameterChoice::StringParam(stream_id.clone())),
        ("last_seq", ParameterChoice::Int64Param(last_seq)),
    ];
    // The stream id on another streaming model's name is refused.
    let mut elsewhere = step(4, true, false, Samples::None, &resume);
    elsewhere.model_name = "vad_energy".into();
    tx.send(elsewhere).await.unwrap();
    let refused = answer(&mut answers).await;
    assert!(
        refused
            .error_message
            .contains("is on model 'silero_vad', not 'vad_energy'"),
        "{refused:?}"
    );
    tx.send(step(4, true, false, Samples::None, &resume))
        .await
        .unwrap();
    let r = ok(&mut answers).await;
    assert_eq!(text(&r, "stream_id"), stream_id);
    assert!(matches!(
        r.parameters["resumed"].parameter_choice,
        Some(ParameterChoice::BoolParam(true))
    ));
    let from = int(&r, "samples_received") as usize;
    assert_eq!(from, half, "the server holds all the audio sent");
    got.add(&r);
    let rest: Vec<&[i16]> = pcm[from..].chunks(4096).collect();
    for (i, chunk) in rest.iter().enumerate() {
        let end = i + 1 == rest.len();
        tx.send(step(4, false, end, Samples::Pcm(chunk), &[]))
            .await
            .unwrap();
        got.add(&ok(&mut answers).await);
    }
    assert_eq!(got, want, "nothing lost or repeated across the two calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_hands_a_sequence_over_to_another_instance() {
    let keys = keys_file();
    let with_keys = |config: &mut streamserve::config::Config| {
        config.stream_token_keys = Some(keys.clone());
        config.stream_checkpoint_ms = 500;
        config.drain_secs = 5;
    };
    let a = server(with_keys);
    let b = server(with_keys);
    let want = websocket_reference(&b).await;
    let (pcm, _) = fixture();
    let mut c = grpc_client(&a).await;
    let (tx, mut answers) = call(&mut c).await;
    let mut got = Results::default();
    let mut last_seq = -1;
    let checkpoints = [("checkpoints", ParameterChoice::BoolParam(true))];
    for (i, chunk) in pcm[..pcm.len() / 2].chunks(4000).enumerate() {
        let options: &[_] = if i == 0 { &checkpoints } else { &[] };
        tx.send(step(5, i == 0, false, Samples::Pcm(chunk), options))
            .await
            .unwrap();
        let r = ok(&mut answers).await;
        if r.parameters.contains_key("last_seq") {
            last_seq = int(&r, "last_seq");
        }
        got.add(&r);
    }
    let stopping = tokio::spawn(async move { a.shutdown().await });
    // Unasked, the stream's last checkpoint (not an error: Triton's client would hide it),
    // then the call's end.
    let handover = ok(&mut answers).await;
    assert!(matches!(
        handover.parameters["handover"].parameter_choice,
        Some(ParameterChoice::BoolParam(true))
    ));
    assert_eq!(int(&handover, "sequence_id"), 5);
    let token = text(&handover, "checkpoint");
    let from = int(&handover, "checkpoint_samples") as usize;
    got.add(&handover);
    if handover.parameters.contains_key("last_seq") {
        last_seq = int(&handover, "last_seq");
    }
    let end = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .unwrap();
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    stopping.await.unwrap();

    let mut c = grpc_client(&b).await;
    let (tx, mut answers) = call(&mut c).await;
    let resume = [
        ("resume", ParameterChoice::StringParam(token)),
        ("last_seq", ParameterChoice::Int64Param(last_seq)),
    ];
    tx.send(step(5, true, false, Samples::None, &resume))
        .await
        .unwrap();
    let r = ok(&mut answers).await;
    assert_eq!(int(&r, "samples_received") as usize, from);
    got.add(&r);
    let rest: Vec<&[i16]> = pcm[from..].chunks(4000).collect();
    for (i, chunk) in rest.iter().enumerate() {
        tx.send(step(
            5,
            false,
            i + 1 == rest.len(),
            Samples::Pcm(chunk),
            &[],
        ))
        .await
        .unwrap();
        got.add(&ok(&mut answers).await);
    }
    assert_eq!(
        got, want,
        "the stream went on on the other instance, exactly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_steps_get_reasons_while_a_good_sequence_carries_on() {
    let running = server(|_| {});
    let want = websocket_reference(&running).await;
    let (pcm, _) = fixture();
    let mut c = grpc_client(&running).await;
    let (tx, mut answers) = call(&mut c).await;
    let mut good = Results::default();
    let good_steps: Vec<&[i16]> = pcm.chunks(4096).collect();

    let mut on_mlp = step(21, true, false, Samples::Pcm(&pcm[..512]), &[]);
    on_mlp.model_name = "mlp".into();
    let mut unknown_model = step(22, true, false, Samples::Pcm(&pcm[..512]), &[]);
    unknown_model.model_name = "nosuch".into();
    let mut fp64 = step(23, true, false, Samples::Pcm(&pcm[..512]), &[]);
    fp64.inputs[0].datatype = "FP64".into();
    fp64.inputs[0].shape = vec![128];
    let mut two_rows = step(24, true, false, Samples::Pcm(&pcm[..512]), &[]);
    two_rows.inputs[0].shape = vec![2, 256];
    let mut short_raw = step(25, true, false, Samples::Pcm(&pcm[..512]), &[]);
    short_raw.raw_input_contents[0].truncate(100);
    let mut no_id = step(26, true, false, Samples::None, &[]);
    no_id.parameters.remove("sequence_id");
    let mut text_flag = step(27, true, false, Samples::None, &[]);
    text_flag.parameters.insert(
        "sequence_start".into(),
        p(ParameterChoice::StringParam("yes".into())),
    );
    let loud = [1.5f32; 64];
    let bad: Vec<(ModelInferRequest, &str)> = vec![
        (
            step(20, false, false, Samples::Pcm(&pcm[..512]), &[]),
            "is not running on this call",
        ),
        (on_mlp, "does not serve streams"),
        (unknown_model, "unknown model"),
        (fp64, "INT16 (PCM) or FP32"),
        (two_rows, "shape [N] or [1, N]"),
        (short_raw, "raw"),
        (
            step(28, true, false, Samples::Float(&loud), &[]),
            "outside [-1, 1]",
        ),
        (
            step(
                29,
                true,
                false,
                Samples::None,
                &[("sample_rate", ParameterChoice::Int64Param(44100))],
            ),
            "sample_rate must be 16000 or 8000",
        ),
        (
            step(
                30,
                true,
                false,
                Samples::None,
                &[("colour", ParameterChoice::StringParam("red".into()))],
            ),
            "not a stream option",
        ),
        (
            step(
                31,
                true,
                false,
                Samples::None,
                &[(
                    "min_silence_ms",
                    ParameterChoice::StringParam("long".into()),
                )],
            ),
            "stream options",
        ),
        (
            step(
                32,
                true,
                false,
                Samples::None,
                &[("resume", ParameterChoice::StringParam("%%%".into()))],
            ),
            "malformed",
        ),
        (step(0, true, false, Samples::None, &[]), "non-zero"),
        (no_id, "need a sequence_id"),
        (text_flag, "must be a bool_param"),
    ];
    let cases = bad.len();
    let mut bad = bad.into_iter();
    // One good step, then one bad one, in turn, on the same call.
    for i in 0..good_steps.len().max(cases) {
        if i < good_steps.len() {
            let end = i + 1 == good_steps.len();
            tx.send(step(1, i == 0, end, Samples::Pcm(good_steps[i]), &[]))
                .await
                .unwrap();
            good.add(&ok(&mut answers).await);
        }
        if let Some((request, needle)) = bad.next() {
            let id = request.id.clone();
            tx.send(request).await.unwrap();
            let a = answer(&mut answers).await;
            assert!(
                a.error_message.contains(needle),
                "'{}' lacks '{needle}'",
                a.error_message
            );
            assert_eq!(
                a.infer_response.unwrap().id,
                id,
                "the error names its request"
            );
        }
    }
    assert_eq!(good, want, "the good sequence never noticed");

    // A sequence started twice, and a stream option after the start.
    let opened = step(40, true, false, Samples::None, &[]);
    tx.send(opened.clone()).await.unwrap();
    ok(&mut answers).await;
    tx.send(opened).await.unwrap();
    let again = answer(&mut answers).await;
    assert!(
        again.error_message.contains("is running on this call"),
        "{}",
        again.error_message
    );
    let late = step(
        40,
        false,
        false,
        Samples::None,
        &[("checkpoints", ParameterChoice::BoolParam(true))],
    );
    tx.send(late).await.unwrap();
    let late = answer(&mut answers).await;
    assert!(
        late.error_message.contains("send it with sequence_start"),
        "{}",
        late.error_message
    );
    // A step after its sequence ended.
    tx.send(step(40, false, true, Samples::None, &[]))
        .await
        .unwrap();
    let ended = ok(&mut answers).await;
    assert!(ended.parameters.contains_key("duration"));
    tx.send(step(40, false, false, Samples::None, &[]))
        .await
        .unwrap();
    let after = answer(&mut answers).await;
    assert!(
        after.error_message.contains("is not running"),
        "{}",
        after.error_message
    );

    // A unary call cannot carry a sequence.
    let unary = c
        .model_infer(step(50, true, false, Samples::Pcm(&pcm[..512]), &[]))
        .await;
    let status = unary.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("ModelStreamInfer"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_steps_retried_starts_and_idle_sequences() {
    let running = server(|config| config.stream_idle_secs = 1);
    let (pcm, _) = fixture();
    let mut c = grpc_client(&running).await;
    let (tx, mut answers) = call(&mut c).await;

    // A step as long as a stream's whole audio room, after a partial chunk holds some of it.
    tx.send(step(1, true, false, Samples::Pcm(&pcm[..1000]), &[]))
        .await
        .unwrap();
    ok(&mut answers).await;
    let long: Vec<i16> = pcm.iter().copied().cycle().take(65_536).collect();
    tx.send(step(1, false, true, Samples::Pcm(&long), &[]))
        .await
        .unwrap();
    let last = ok(&mut answers).await;
    assert_eq!(
        int(&last, "chunks"),
        (1000 + 65_536_i64).div_euclid(512) + 1
    );

    // A start that fails may be tried again at once, with the same id.
    let bad_rate = [("sample_rate", ParameterChoice::Int64Param(8001))];
    tx.send(step(2, true, false, Samples::None, &bad_rate))
        .await
        .unwrap();
    let refused = answer(&mut answers).await;
    assert!(refused.error_message.contains("sample_rate"), "{refused:?}");
    tx.send(step(2, true, false, Samples::Pcm(&pcm[..2048]), &[]))
        .await
        .unwrap();
    let retried = ok(&mut answers).await;
    let stream_id = text(&retried, "stream_id");

    // A sequence with no step for --stream-idle-secs is let go on this call; its stream
    // waits for a resume.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    tx.send(step(2, false, false, Samples::Pcm(&pcm[2048..4096]), &[]))
        .await
        .unwrap();
    let idle = answer(&mut answers).await;
    assert!(
        idle.error_message.contains("is not running on this call"),
        "{idle:?}"
    );
    let resume = [
        ("stream_id", ParameterChoice::StringParam(stream_id)),
        (
            "last_seq",
            ParameterChoice::Int64Param(int(&retried, "last_seq")),
        ),
    ];
    tx.send(step(2, true, false, Samples::None, &resume))
        .await
        .unwrap();
    let resumed = ok(&mut answers).await;
    assert_eq!(int(&resumed, "samples_received"), 2048);

    // A sequence that keeps sending is never idle, however long it runs: its steps come every
    // 250 ms for 1.6 s against the 1 s idle time, and each is answered.
    tx.send(step(3, true, false, Samples::Pcm(&pcm[..512]), &[]))
        .await
        .unwrap();
    ok(&mut answers).await;
    let began = std::time::Instant::now();
    let mut steps = 1;
    while began.elapsed() < Duration::from_millis(1600) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tx.send(step(3, false, false, Samples::Pcm(&pcm[..512]), &[]))
            .await
            .unwrap();
        ok(&mut answers).await;
        steps += 1;
    }
    tx.send(step(3, false, true, Samples::Pcm(&pcm[..512]), &[]))
        .await
        .unwrap();
    let last = ok(&mut answers).await;
    assert_eq!(
        int(&last, "chunks"),
        steps + 1,
        "every step's chunk was answered"
    );
}
