//! The stream engine against models described by hand (no ONNX Runtime): Silero's stepping,
//! a three-stage chain like the keyword spotter's, the same chain gated by a voice activity
//! model, and checkpoints that go on exactly. (`stream::layout`'s tests take the same models.)

use super::*;
use crate::manifest::{
    AllowedValue, BatchAxis, Batching, Device, OutputDecl, StageDecl, StreamDecl, StreamKind,
    WindowDecl,
};
use crate::model::ModelInfo;
use crate::model::Resources;
use crate::runtime::TensorSpec;
use crate::tensor::{DataType, NamedTensor};

fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype,
        shape: shape.to_vec(),
    }
}

fn info(name: &str, inputs: Vec<(TensorSpec, BatchAxis)>, outputs: Vec<TensorSpec>) -> ModelInfo {
    let output_axes = vec![BatchAxis::Axis(0); outputs.len()];
    ModelInfo {
        name: name.into(),
        version: "1".into(),
        input_rules: vec![Default::default(); inputs.len()],
        input_axes: inputs.iter().map(|(_, a)| *a).collect(),
        inputs: inputs.into_iter().map(|(s, _)| s).collect(),
        allow_non_finite: false,
        outputs,
        batching: Batching {
            max_batch_size: 64,
            max_queue_delay: std::time::Duration::ZERO,
        },
        output_axes,
        stream: None,
        device: Device::Cpu,
        replicas: 1,
        max_queue: 16,
        fallback: None,
        slo: None,
        sha256: String::new(),
        description: String::new(),
        source: String::new(),
        resources: Resources::default(),
    }
}

pub(in crate::stream) fn silero() -> ModelInfo {
    let mut m = info(
        "vad",
        vec![
            (
                spec("input", DataType::Fp32, &[-1, 576]),
                BatchAxis::Axis(0),
            ),
            (
                spec("state", DataType::Fp32, &[2, -1, 128]),
                BatchAxis::Axis(1),
            ),
            (spec("sr", DataType::Int64, &[]), BatchAxis::Shared),
        ],
        vec![
            spec("output", DataType::Fp32, &[-1, 1]),
            spec("stateN", DataType::Fp32, &[2, -1, 128]),
        ],
    );
    m.output_axes[1] = BatchAxis::Axis(1);
    // As the bundled manifest declares them: 512 + 64 samples at 16 kHz, 256 + 32 at 8 kHz.
    m.input_rules[0] = crate::rules::InputRule {
        shapes: vec![vec![-1, 576], vec![-1, 288]],
        values: Vec::new(),
        paired_with: Some("sr".into()),
        paired: Some(2),
    };
    m.input_rules[2].values = vec![AllowedValue::Int(16000), AllowedValue::Int(8000)];
    m
}

fn fp32(t: &NamedTensor) -> &[f32] {
    match &t.data {
        TensorData::Fp32(v) => v,
        other => panic!("not fp32: {other:?}"),
    }
}

/// Runs every step the stream has ready, answering each with `model`; returns (stage, done).
fn drain(
    layout: &Layout,
    state: &mut PipelineState,
    ending: bool,
    model: &dyn Fn(usize, &InferRequest) -> Vec<TensorData>,
) -> Vec<(usize, StepDone)> {
    let mut steps = Vec::new();
    while let Some(stage) = state.next_step(layout, ending) {
        let request = state.request(layout, stage);
        let outputs = model(stage, &request);
        steps.push((stage, state.complete(layout, stage, &outputs).unwrap()));
    }
    steps
}

#[test]
fn silero_steps_as_its_own_wrapper_does() {
    let decl = StreamDecl::silero_vad();
    let vad = silero();
    let layout = Layout::resolve(&decl, &[&vad], 16000).unwrap();
    assert_eq!(
        (layout.stages[0].window, layout.chunk_samples()),
        (576, 512)
    );
    let mut state = PipelineState::new(&layout);
    let audio: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    state.push_audio(&audio);
    let seen = std::cell::RefCell::new(Vec::new());
    let model = |_: usize, r: &InferRequest| {
        assert_eq!(r.inputs[0].shape, [1, 576]);
        assert_eq!(r.inputs[1].shape, [2, 1, 128]);
        assert_eq!(r.inputs[2].data, TensorData::Int64(vec![16000]));
        assert_eq!(r.outputs, [0, 1]);
        seen.borrow_mut().push(fp32(&r.inputs[0]).to_vec());
        vec![
            TensorData::Fp32(vec![0.75]),
            TensorData::Fp32(vec![1.0; 256]),
        ]
    };
    let steps = drain(&layout, &mut state, false, &model);
    assert_eq!(steps.len(), 1);
    assert_eq!(
        steps[0].1,
        StepDone {
            time: 512,
            heard: 512,
            audio_taken: 512,
            value: 0.75
        }
    );
    // 64 samples of context (silence at the start), then the chunk.
    let first = seen.borrow()[0].clone();
    assert!(first[..64].iter().all(|&x| x == 0.0));
    assert_eq!(&first[64..], &audio[..512]);
    // The end pads the last 488 samples with silence to a window: the step reaches 1024,
    // the audio it heard 1000.
    let steps = drain(&layout, &mut state, true, &model);
    assert_eq!(
        steps[0].1,
        StepDone {
            time: 1024,
            heard: 1000,
            audio_taken: 488,
            value: 0.75
        }
    );
    let last = seen.borrow()[1].clone();
    assert_eq!(&last[..64], &audio[448..512]);
    assert_eq!(&last[64..552], &audio[512..]);
    assert!(last[552..].iter().all(|&x| x == 0.0));
    assert_eq!(state.next_step(&layout, true), None);
    // 8 kHz halves the window; other rates are refused with the ones it takes.
    let at_8k = Layout::resolve(&decl, &[&vad], 8000).unwrap();
    assert_eq!((at_8k.stages[0].window, at_8k.chunk_samples()), (288, 256));
    let err = Layout::resolve(&decl, &[&vad], 44100).unwrap_err();
    assert_eq!(err, "sample_rate must be 16000 or 8000, got 44100");
}

/// Audio (window 6, hop 4) -> 2 frames of 3; frames (window 4, hop 2, prefill 2 of 1.0) -> one
/// frame of 5; frames (window 3, hop 1) -> a score.
pub(in crate::stream) fn chain() -> (StreamDecl, Vec<ModelInfo>) {
    let frames = |tensor: &str, window, hop, prefill, pad| WindowDecl {
        tensor: tensor.into(),
        window: Some(window),
        hop: Some(hop),
        window_ms: None,
        hop_ms: None,
        prefill,
        pad,
    };
    let stage = |model: &str, input, output: &str, frames| StageDecl {
        model: model.into(),
        input,
        output: OutputDecl {
            tensor: output.into(),
            frames,
        },
        state: Default::default(),
        constants: Default::default(),
    };
    let audio = WindowDecl {
        tensor: "audio".into(),
        window: None,
        hop: None,
        window_ms: Some(6.0),
        hop_ms: Some(4.0),
        prefill: None,
        pad: 0.0,
    };
    let decl = StreamDecl {
        kind: StreamKind::Keyword,
        sample_rates: vec![1000],
        phrase: Some("x".into()),
        stages: vec![
            stage("feat", audio, "feat", 2),
            stage("emb", frames("feat", 4, 2, Some(2), 1.0), "emb", 1),
        ],
        input: frames("emb", 3, 1, Some(0), 0.0),
        output: OutputDecl {
            tensor: "score".into(),
            frames: 1,
        },
        state: Default::default(),
        constants: Default::default(),
        gate: None,
    };
    let models = vec![
        info(
            "feat",
            vec![(spec("audio", DataType::Fp32, &[-1, 6]), BatchAxis::Axis(0))],
            vec![spec("feat", DataType::Fp32, &[-1, 2, 3])],
        ),
        info(
            "emb",
            vec![(
                spec("feat", DataType::Fp32, &[-1, 4, 3, 1]),
                BatchAxis::Axis(0),
            )],
            vec![spec("emb", DataType::Fp32, &[-1, 1, 1, 5])],
        ),
        info(
            "kw",
            vec![(spec("emb", DataType::Fp32, &[-1, 3, 5]), BatchAxis::Axis(0))],
            vec![spec("score", DataType::Fp32, &[-1, 1])],
        ),
    ];
    (decl, models)
}

/// Each stage's output is a function of its whole window (a weighted sum per output element),
/// so any frame out of place changes the score.
fn chain_model(stage: usize, r: &InferRequest) -> Vec<TensorData> {
    let x = fp32(&r.inputs[0]);
    let weighted = |k: usize| -> f32 {
        x.iter()
            .enumerate()
            .map(|(i, v)| v * ((i * 7 + k * 3) % 11) as f32)
            .sum::<f32>()
            * 1e-3
    };
    let n = [6, 5, 1][stage];
    vec![TensorData::Fp32((0..n).map(weighted).collect())]
}

fn run_chain(audio: &[f32], pieces: usize) -> Vec<(usize, StepDone)> {
    let (decl, models) = chain();
    let infos: Vec<&ModelInfo> = models.iter().collect();
    let layout = Layout::resolve(&decl, &infos, 1000).unwrap();
    let mut state = PipelineState::new(&layout);
    let mut steps = Vec::new();
    for piece in audio.chunks(audio.len().div_ceil(pieces)) {
        state.push_audio(piece);
        steps.extend(drain(&layout, &mut state, false, &chain_model));
    }
    steps.extend(drain(&layout, &mut state, true, &chain_model));
    steps
}

#[test]
fn a_chain_steps_downstream_first_and_stamps_audio_time() {
    let (decl, models) = chain();
    let infos: Vec<&ModelInfo> = models.iter().collect();
    let layout = Layout::resolve(&decl, &infos, 1000).unwrap();
    assert_eq!(layout.chunk_samples(), 4);
    let audio: Vec<f32> = (0..30).map(|i| (i as f32).sin()).collect();
    let steps = run_chain(&audio, 1);
    let order: Vec<usize> = steps.iter().map(|(s, _)| *s).collect();
    // feat makes 2 frames per step; emb needs 2 new ones (after its prefill of 2) per step;
    // the scorer needs 3 embeddings, then steps on each new one.
    assert_eq!(&order[..8], &[0, 1, 0, 1, 0, 1, 2, 0]);
    let scores: Vec<u64> = steps
        .iter()
        .filter(|(s, _)| *s == 2)
        .map(|(_, d)| d.time)
        .collect();
    assert_eq!(
        scores[0], 12,
        "the first score covers the audio up to the third chunk"
    );
    assert!(scores.windows(2).all(|w| w[1] == w[0] + 4));
    let taken: u64 = steps.iter().map(|(_, d)| d.audio_taken).sum();
    assert_eq!(taken, 30, "every sample is stepped, the last ones padded");
    // The padded last window reaches 32; every stage's step heard no further than the 30
    // samples of audio, and a step before the end heard all it reached.
    let last = steps.last().unwrap().1;
    assert_eq!((last.time, last.heard), (32, 30));
    assert!(steps
        .iter()
        .all(|(_, d)| d.heard == d.time.min(30) && d.heard <= 30));
    // However the audio arrives, the results are the same.
    assert_eq!(run_chain(&audio, 7), steps);
}

#[test]
fn a_checkpoint_goes_on_exactly() {
    let (decl, models) = chain();
    let infos: Vec<&ModelInfo> = models.iter().collect();
    let layout = Layout::resolve(&decl, &infos, 1000).unwrap();
    let audio: Vec<f32> = (0..41).map(|i| (i as f32 * 0.3).cos()).collect();
    let whole = run_chain(&audio, 1);

    let mut state = PipelineState::new(&layout);
    state.push_audio(&audio[..23]);
    let mut steps = drain(&layout, &mut state, false, &chain_model);
    let checkpoint = state.snapshot();
    assert!(checkpoint.fits(&layout));
    assert_eq!(checkpoint.audio_in, checkpoint.audio_done);
    // The client sends again from the checkpoint's sample on.
    let mut resumed: PipelineState =
        postcard::from_bytes(&postcard::to_stdvec(&checkpoint).unwrap()).unwrap();
    resumed.push_audio(&audio[checkpoint.audio_done as usize..]);
    steps.extend(drain(&layout, &mut resumed, true, &chain_model));
    assert_eq!(steps, whole);
    // A Silero-sized progress does not fit the chain.
    assert!(!PipelineState::example().fits(&layout));
}

#[test]
fn declarations_that_do_not_fit_their_models_say_why() {
    let (mut decl, models) = chain();
    let infos: Vec<&ModelInfo> = models.iter().collect();
    decl.stages[1].output.frames = 2;
    let err = Layout::resolve(&decl, &infos, 1000).unwrap_err();
    assert!(
        err.contains("stage 1 (emb)") && err.contains("divide into 2 frames"),
        "{err}"
    );
    let (mut decl, _) = chain();
    decl.stages[1].input.window = Some(5);
    let err = Layout::resolve(&decl, &infos, 1000).unwrap_err();
    assert!(
        err.contains("cannot take a window of 5 frames of 3"),
        "{err}"
    );
    let (mut decl, _) = chain();
    decl.input.tensor = "embeddings".into();
    let err = Layout::resolve(&decl, &infos, 1000).unwrap_err();
    assert!(
        err.contains("stage 2 (kw): the model has no input 'embeddings'"),
        "{err}"
    );
}

#[test]
fn windows_rates_and_pads_the_model_refuses_are_refused_by_the_layout() {
    // Silero's rules take 576 samples with sr 16000 and 288 with 8000: a declaration that
    // also lists 48 kHz resolves at the two rates, and not at the third.
    let mut decl = StreamDecl::silero_vad();
    decl.sample_rates.push(48000);
    let vad = silero();
    assert!(Layout::resolve(&decl, &[&vad], 8000).is_ok());
    let err = Layout::resolve(&decl, &[&vad], 48000).unwrap_err();
    assert!(
        err.contains("at 48000 Hz the model would refuse its steps") && err.contains("[1, 1728]"),
        "{err}"
    );
    // A window the first stage's fixed [batch, 6] input cannot take (5 samples).
    let (mut decl, models) = chain();
    let infos: Vec<&ModelInfo> = models.iter().collect();
    decl.stages[0].input.window_ms = Some(5.0);
    let err = Layout::resolve(&decl, &infos, 1000).unwrap_err();
    assert!(
        err.contains("stage 0 (feat)") && err.contains("dimension 1 must be 6"),
        "{err}"
    );
    // A pad the model would refuse as a value.
    let (mut decl, _) = chain();
    decl.stages[1].input.pad = f32::NAN;
    let err = Layout::resolve(&decl, &infos, 1000).unwrap_err();
    assert!(
        err.contains("stage 1 (emb)") && err.contains("NaN"),
        "{err}"
    );
    // A window past what a stream may hold is refused before anything is allocated for it.
    let (mut decl, _) = chain();
    decl.input.window = Some(usize::MAX / 2);
    let err = Layout::resolve(&decl, &infos, 1000).unwrap_err();
    assert!(err.contains("values"), "{err}");
}

/// The chain with a gate on its second stage: a voice activity model of 4-sample chunks that
/// hears speech where the chunk's mean magnitude is above 0.5; 4 samples of hangover.
pub(in crate::stream) fn gated_chain() -> (StreamDecl, Vec<ModelInfo>) {
    let (mut decl, mut models) = chain();
    decl.gate = Some(crate::manifest::GateDecl {
        model: "gate".into(),
        stage: "emb".into(),
        threshold: 0.5,
        hangover_ms: 4.0,
    });
    let mut gate = info(
        "gate",
        vec![(spec("audio", DataType::Fp32, &[-1, 4]), BatchAxis::Axis(0))],
        vec![spec("p", DataType::Fp32, &[-1, 1])],
    );
    let mut vad = StreamDecl::silero_vad();
    vad.sample_rates = vec![1000];
    vad.input.tensor = "audio".into();
    (vad.input.window_ms, vad.input.hop_ms) = (Some(4.0), Some(4.0));
    vad.output.tensor = "p".into();
    (vad.state, vad.constants) = Default::default();
    gate.stream = Some(std::sync::Arc::new(vad));
    models.push(gate);
    (decl, models)
}

fn gated_model(stage: usize, r: &InferRequest) -> Vec<TensorData> {
    if stage < 3 {
        return chain_model(stage, r);
    }
    let x = fp32(&r.inputs[0]);
    let loud = x.iter().map(|v| v.abs()).sum::<f32>() / x.len() as f32 > 0.5;
    vec![TensorData::Fp32(vec![if loud { 0.9 } else { 0.1 }])]
}

/// 40 samples of silence, 20 of speech, 40 of silence, 20 of speech, 30 of silence.
fn speech_and_silence() -> Vec<f32> {
    let speech = |n: usize| (0..n).map(|i| 1.0 + (i as f32).sin() * 0.3);
    let quiet = |n: usize| (0..n).map(|i| (i as f32 * 0.7).sin() * 0.01);
    quiet(40)
        .chain(speech(20))
        .chain(quiet(40))
        .chain(speech(20))
        .chain(quiet(30))
        .collect()
}

/// Each stage's steps, in order: stages that read the audio side by side interleave as the
/// audio arrives.
fn by_stage(steps: &[(usize, StepDone)]) -> Vec<Vec<StepDone>> {
    let mut stages = vec![Vec::new(); 4];
    for (stage, done) in steps {
        stages[*stage].push(*done);
    }
    stages
}

fn run_gated(
    layout: &Layout,
    audio: &[f32],
    pieces: usize,
) -> (Vec<(usize, StepDone)>, PipelineState) {
    let mut state = PipelineState::new(layout);
    let mut steps = Vec::new();
    for piece in audio.chunks(audio.len().div_ceil(pieces)) {
        state.push_audio(piece);
        steps.extend(drain(layout, &mut state, false, &gated_model));
    }
    steps.extend(drain(layout, &mut state, true, &gated_model));
    (steps, state)
}

#[test]
fn a_gated_stage_runs_only_around_speech_with_the_ungated_results_there() {
    let (decl, models) = gated_chain();
    let infos: Vec<&ModelInfo> = models.iter().collect();
    let layout = Layout::resolve(&decl, &infos, 1000).unwrap();
    let gate = layout.gate.as_ref().unwrap();
    // The scorer looks back over 2 embeddings of 4 samples each.
    assert_eq!((gate.gated, gate.hangover, gate.lookback), (1, 4, 8));
    let audio = speech_and_silence();
    let (steps, state) = run_gated(&layout, &audio, 1);
    let ungated = run_chain(&audio, 1);
    let of = |steps: &[(usize, StepDone)], stage| -> Vec<StepDone> {
        steps
            .iter()
            .filter(|(s, _)| *s == stage)
            .map(|(_, d)| *d)
            .collect()
    };
    // The gate heard all the audio, in its own 4-sample chunks.
    let heard = of(&steps, 3);
    assert_eq!(heard.len(), audio.len().div_ceil(4));
    let speech: Vec<u64> = heard
        .iter()
        .filter(|d| d.value >= 0.5)
        .map(|d| d.time)
        .collect();
    assert!(!speech.is_empty());
    // Every score the gated stream makes is the ungated stream's score at that time, and it
    // makes every score that has speech in the hangover before it.
    let all_scores = of(&ungated, 2);
    let scores = of(&steps, 2);
    for done in &scores {
        assert!(
            all_scores.contains(done),
            "{done:?} is not an ungated score"
        );
    }
    for done in &all_scores {
        if speech.iter().any(|&s| s <= done.time && done.time <= s + 4) {
            assert!(scores.contains(done), "{done:?} is missing");
        }
    }
    // The silence cost no embedding steps: those were skipped, and counted.
    let (embedded, all_embedded) = (of(&steps, 1).len(), of(&ungated, 1).len());
    assert!(embedded < all_embedded, "{embedded} of {all_embedded}");
    assert_eq!(state.gated_skips(), (all_embedded - embedded) as u64);
    // The first stage and the audio it took are the ungated stream's.
    assert_eq!(of(&steps, 0), of(&ungated, 0));
    // However the audio arrives, each stage makes the same steps (the gate and the first
    // stage interleave differently).
    assert_eq!(by_stage(&run_gated(&layout, &audio, 9).0), by_stage(&steps));

    // Silence alone: the gate runs, the gated stage never does.
    let quiet = vec![0.0; 60];
    let (steps, state) = run_gated(&layout, &quiet, 3);
    assert!(of(&steps, 1).is_empty() && of(&steps, 2).is_empty());
    assert_eq!(
        state.gated_skips(),
        of(&run_chain(&quiet, 1), 1).len() as u64
    );
}

#[test]
fn a_gated_checkpoint_goes_on_exactly_wherever_it_is_taken() {
    let (decl, models) = gated_chain();
    let infos: Vec<&ModelInfo> = models.iter().collect();
    let layout = Layout::resolve(&decl, &infos, 1000).unwrap();
    let audio = speech_and_silence();
    let (whole, _) = run_gated(&layout, &audio, 1);
    assert!(whole.iter().any(|(stage, _)| *stage == 2));
    // Every split: the gate is ahead of the first stage at some, behind it at others.
    for split in 1..audio.len() {
        let mut state = PipelineState::new(&layout);
        let mut steps = Vec::new();
        for piece in audio[..split].chunks(3) {
            state.push_audio(piece);
            steps.extend(drain(&layout, &mut state, false, &gated_model));
        }
        let checkpoint = state.snapshot();
        assert!(checkpoint.fits(&layout), "split {split}");
        // The client sends again from the checkpoint's sample on.
        let mut resumed: PipelineState =
            postcard::from_bytes(&postcard::to_stdvec(&checkpoint).unwrap()).unwrap();
        resumed.push_audio(&audio[checkpoint.audio_done as usize..]);
        steps.extend(drain(&layout, &mut resumed, true, &gated_model));
        assert_eq!(
            by_stage(&steps),
            by_stage(&whole),
            "split at {split} (checkpoint at {})",
            checkpoint.audio_done
        );
    }
    // An ungated progress does not fit the gated layout, nor the other way round.
    let (plain, plain_models) = chain();
    let plain_infos: Vec<&ModelInfo> = plain_models.iter().collect();
    let plain_layout = Layout::resolve(&plain, &plain_infos, 1000).unwrap();
    assert!(!PipelineState::new(&plain_layout).fits(&layout));
    assert!(!PipelineState::new(&layout).fits(&plain_layout));
}
