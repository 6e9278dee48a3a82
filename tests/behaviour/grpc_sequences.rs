//! Speech streams over gRPC with Triton's sequence conventions (`sequence_id`,
//! `sequence_start`, `sequence_end` on `ModelStreamInfer`), with a tonic client over a real
//! socket against the real server on the bundled Silero VAD. A sequence must give exactly
//! what a WebSocket stream of the same audio gives (the same probabilities, events and
//! segments); it resumes on a new call from its stream id, and on another instance from its
//! checkpoint after a shutdown handed it over; bad steps get their reasons while a good
//! sequence on the same call carries on.

use crate::common;

use std::time::Duration;

use common::grpc_sequence::*;
use common::*;
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use streamserve::api::grpc::proto::inference::*;
use tonic::Code;

fn server(tweak: impl FnOnce(&mut streamserve::config::Config)) -> streamserve::server::Running {
    start_running(&repo().join("models"), tweak)
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

/// A refused `sequence_start` leaves nothing: not its id (it starts again at once), not the
/// key's one stream place, not a stream, whether it was refused for its options or audio
/// before anything opened or for the key's audio allowance once a stream had opened (a new
/// one, or one taken over from a token: no copy of it is left to resume by stream id).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_start_leaves_nothing_behind() {
    let tokens = keys_file();
    let (api_keys, key) =
        api_key("models = [\"silero_vad\"]\nmax_streams = 1\naudio_secs_per_min = 1");
    let a = server(|config| {
        config.stream_token_keys = Some(tokens.clone());
        config.stream_checkpoint_ms = 500;
    });
    let b = server(|config| {
        config.stream_token_keys = Some(tokens.clone());
        config.api_keys = Some(api_keys);
    });
    let (pcm, _) = fixture();
    // A checkpoint of a stream on `a`, for `b` to take the stream over from.
    let on_a = checkpointed(&mut grpc_client(&a).await, &pcm[..12_000]).await;
    let (from, last_seq) = (on_a.samples, on_a.last_seq);
    let last_seq = ("last_seq", ParameterChoice::Int64Param(last_seq));
    let resume = [
        ("resume", ParameterChoice::StringParam(on_a.token.clone())),
        last_seq.clone(),
    ];
    let stream_id = on_a.stream_id.clone();

    let mut on_b = Call::open(&mut grpc_client(&b).await, Some(&key)).await;
    let bogus = [("bogus", ParameterChoice::Int64Param(1))];
    let bad = step(1, true, false, Samples::Pcm(&pcm[..512]), &bogus);
    on_b.refused(bad, "not a stream option").await;
    let bad = step(2, true, false, Samples::Float(&[2.0; 512]), &[]);
    on_b.refused(bad, "outside [-1, 1]").await;
    // Over the key's 1 s of audio a minute: refused once the stream is open.
    let long = Samples::Pcm(&pcm[..20_000]);
    on_b.refused(step(3, true, false, long, &[]), "audio per minute")
        .await;
    let long = Samples::Pcm(&pcm[..20_000]);
    on_b.refused(step(4, true, false, long, &resume), "audio per minute")
        .await;
    let by_id = [
        ("stream_id", ParameterChoice::StringParam(stream_id)),
        last_seq,
    ];
    let by_id = step(4, true, false, Samples::None, &by_id);
    on_b.refused(by_id, "unknown or expired stream_id").await;
    // Each id starts again at once, one at a time as the key's one place allows.
    for id in 1..=3 {
        on_b.ok(step(id, true, false, Samples::Pcm(&pcm[..2048]), &[]))
            .await;
        let another = step(9, true, false, Samples::None, &[]);
        on_b.refused(another, "1 open streams").await;
        let end = on_b.ok(step(id, false, true, Samples::None, &[])).await;
        assert_eq!(int(&end, "chunks"), 4);
    }
    let audio = Samples::Pcm(&pcm[from..from + 2048]);
    let r = on_b.ok(step(4, true, false, audio, &resume)).await;
    assert_eq!(int(&r, "samples_received") as usize, from, "taken over");
}

/// Audio that a call sends after a newer call resumed its stream is not the stream's: its step
/// is refused ("superseded") having added nothing, and the newer call's steps get the results
/// of their own audio, each sample counted once, exactly as one call would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_superseded_call_adds_no_audio_to_the_stream() {
    let running = server(|_| {});
    let (pcm, _) = fixture();
    let steps: Vec<&[i16]> = pcm[16_000..24_192].chunks(2048).collect();
    let mut c = grpc_client(&running).await;
    let mut one = Call::open(&mut c, None).await;
    let mut want = Results::default();
    for (i, audio) in steps.iter().enumerate() {
        let r = one
            .ok(step(1, i == 0, i == 3, Samples::Pcm(audio), &[]))
            .await;
        want.add(&r);
    }

    let mut old = Call::open(&mut c, None).await;
    let mut got = Results::default();
    let (mut stream_id, mut last_seq) = (String::new(), 0);
    for (i, audio) in steps[..2].iter().enumerate() {
        let r = old
            .ok(step(2, i == 0, false, Samples::Pcm(audio), &[]))
            .await;
        if i == 0 {
            stream_id = text(&r, "stream_id");
        }
        last_seq = int(&r, "last_seq");
        got.add(&r);
    }
    let mut new = Call::open(&mut c, None).await;
    let resume = [
        ("stream_id", ParameterChoice::StringParam(stream_id)),
        ("last_seq", ParameterChoice::Int64Param(last_seq)),
    ];
    let r = new.ok(step(3, true, false, Samples::None, &resume)).await;
    assert_eq!(int(&r, "samples_received"), 4096);
    got.add(&r);
    let late = step(2, false, false, Samples::Pcm(steps[2]), &[]);
    old.refused(late, "superseded by a newer connection").await;
    for (i, audio) in steps[2..].iter().enumerate() {
        let r = new
            .ok(step(3, false, i == 1, Samples::Pcm(audio), &[]))
            .await;
        assert_eq!(u64s(&r, "seq").len(), 4, "the chunks of this step's audio");
        if i == 1 {
            assert_eq!(int(&r, "chunks"), 16);
            assert_eq!(real(&r, "duration"), 8192.0 / 16000.0);
        }
        got.add(&r);
    }
    assert_eq!(got, want, "the stream holds each sample once");
}
