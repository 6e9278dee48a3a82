//! A stream's stages resolved against the models that serve them, at one sample rate
//! ([`Layout`]): which input each stage's window goes to and in what shape, its hop and
//! prefill, the recurrent state it carries, its constant inputs, and the gate's model if the
//! stream has one. Checked when the declaring version loads, at every rate it declares
//! ([`check_declaration`]), and again when a stream starts (its stage models' versions may
//! have changed since), so that stepping (`stream::pipeline`) cannot meet a tensor the
//! declaration did not promise.

use crate::manifest::{
    audio_window, BatchAxis, ConstantDecl, GateDecl, StageDecl, StreamDecl, StreamKind,
};
use crate::model::ModelInfo;
use crate::tensor::{DataType, NamedTensor, TensorData};

/// The most elements a stage's window may hold (64 MiB of f32): every stream keeps its
/// stages' windows, so a declaration past this is a mistake, refused before anything is
/// allocated for it.
const MAX_WINDOW_ELEMENTS: usize = 1 << 24;

/// One stage resolved against its model.
#[derive(Clone, Debug)]
pub struct StageLayout {
    pub model: String,
    pub(super) input_names: Vec<String>,
    pub(super) window_input: usize,
    pub(super) window_shape: Vec<i64>,
    pub window: usize,
    pub hop: usize,
    pub(super) prefill: usize,
    pub(super) pad: f32,
    /// Elements per input frame (1 for audio).
    pub(super) frame_len: usize,
    pub(super) output: usize,
    pub(super) frames_out: usize,
    pub(super) out_frame_len: usize,
    pub(super) recurrent: Vec<Recurrent>,
    pub(super) constants: Vec<(usize, Vec<i64>, TensorData)>,
}

#[derive(Clone, Debug)]
pub(super) struct Recurrent {
    pub(super) input: usize,
    pub(super) output: usize,
    pub(super) shape: Vec<i64>,
    pub(super) len: usize,
}

/// A stream's stages at one sample rate; the first reads the audio.
#[derive(Clone, Debug)]
pub struct Layout {
    pub stages: Vec<StageLayout>,
    pub gate: Option<GateLayout>,
    pub sample_rate: u32,
}

impl Layout {
    /// Resolves `decl` against its stages' models, in order (the declaring model last), and
    /// its gate's model after them if it has a gate.
    pub fn resolve(
        decl: &StreamDecl,
        infos: &[&ModelInfo],
        sample_rate: u32,
    ) -> Result<Layout, String> {
        if !decl.sample_rates.contains(&sample_rate) {
            let rates: Vec<String> = decl.sample_rates.iter().map(u32::to_string).collect();
            return Err(format!(
                "sample_rate must be {}, got {sample_rate}",
                rates.join(" or ")
            ));
        }
        let own = infos
            .get(decl.stages.len())
            .ok_or("the stream's stages and models differ in number")?;
        let stages = decl.stages(&own.name);
        if stages.len() + usize::from(decl.gate.is_some()) != infos.len() {
            return Err("the stream's stages and models differ in number".into());
        }
        let mut frame_len = 1;
        let mut resolved = Vec::with_capacity(stages.len());
        let last = stages.len() - 1;
        for (i, (stage, info)) in stages.iter().zip(infos).enumerate() {
            if info.name != stage.model {
                return Err(format!(
                    "stream stage {i} is '{}', not the model '{}' given for it",
                    stage.model, info.name
                ));
            }
            // Where the manifest declares the stage: a deployer reads this at load.
            let key = if i == last {
                format!("[models.stream] of '{}'", stage.model)
            } else {
                format!("[models.stream] stages[{i}]")
            };
            let layout = resolve_stage(stage, info, (i == 0, i == last), frame_len, sample_rate)
                .map_err(|e| {
                    format!(
                        "stream stage {i} ({}): {e} (declared at {key})",
                        stage.model
                    )
                })?;
            frame_len = layout.out_frame_len;
            resolved.push(layout);
        }
        let gate = match &decl.gate {
            Some(g) if infos[stages.len()].name != g.model => {
                return Err(format!(
                    "the stream's gate is '{}', not the model '{}' given for it",
                    g.model,
                    infos[stages.len()].name
                ))
            }
            Some(g) => Some(
                resolve_gate(g, infos[stages.len()], &resolved, sample_rate).map_err(|e| {
                    format!(
                        "stream gate ({}): {e} (declared at [models.stream.gate])",
                        g.model
                    )
                })?,
            ),
            None => None,
        };
        Ok(Layout {
            stages: resolved,
            gate,
            sample_rate,
        })
    }

    pub(super) fn stage(&self, stage: usize) -> &StageLayout {
        match self.stages.get(stage) {
            Some(s) => s,
            None => &self.gate.as_ref().expect("the gate's stage").stage,
        }
    }

    /// Audio samples per step of the first stage: the stream's chunk.
    pub fn chunk_samples(&self) -> usize {
        self.stages[0].hop
    }
}

/// The models a stream declaration names besides the model that declares it, in the order
/// [`check_declaration`] takes them: its stages', then its gate's.
pub fn declared_models(decl: &StreamDecl) -> Vec<&str> {
    let stages = decl.stages.iter().map(|s| s.model.as_str());
    stages
        .chain(decl.gate.as_ref().map(|g| g.model.as_str()))
        .collect()
}

/// Checks the stream that `own` declares against its models, at every sample rate the
/// declaration lists, as a stream's start resolves it ([`Layout::resolve`]): when the
/// declaring version loads, so that a declaration that does not fit its models refuses that
/// version with the reason (the model, the stage, the manifest key and the tensor), rather
/// than closing every stream at its `start` (1008) while the model looks ready. `others`
/// are the models [`declared_models`] names, in that order: the versions a stream would run
/// on (each model's default). A declaration of no stages and no gate needs none. (A `start`
/// still resolves the stream against the versions it gets then, which a deployment may have
/// changed since.)
pub fn check_declaration(
    decl: &StreamDecl,
    own: &ModelInfo,
    others: &[&ModelInfo],
) -> Result<(), String> {
    let names = declared_models(decl);
    if others.len() != names.len() {
        return Err(format!(
            "the stream names {} models besides '{}' ({}); {} were given",
            names.len(),
            own.name,
            names.join(", "),
            others.len()
        ));
    }
    let (stages, gate) = others.split_at(decl.stages.len());
    let mut infos: Vec<&ModelInfo> = stages.to_vec();
    infos.push(own);
    infos.extend(gate);
    for &rate in &decl.sample_rates {
        Layout::resolve(decl, &infos, rate)?;
    }
    Ok(())
}

/// The gate: its model's own voice activity stream, stepped on the audio.
fn resolve_gate(
    gate: &GateDecl,
    info: &ModelInfo,
    stages: &[StageLayout],
    sample_rate: u32,
) -> Result<GateLayout, String> {
    let decl = info
        .stream
        .as_deref()
        .filter(|d| d.kind == StreamKind::Vad && d.stages.is_empty())
        .ok_or("the gate must serve voice activity streams on its own")?;
    if !decl.sample_rates.contains(&sample_rate) {
        return Err(format!("it does not take {sample_rate} Hz"));
    }
    let stage = resolve_stage(
        &decl.stages(&info.name)[0],
        info,
        (true, true),
        1,
        sample_rate,
    )?;
    let gated = stages
        .iter()
        .position(|s| s.model == gate.stage)
        .filter(|&i| i > 0)
        .ok_or_else(|| format!("'{}' is not a stage after the first", gate.stage))?;
    Ok(GateLayout {
        stage,
        gated,
        threshold: gate.threshold,
        hangover: (gate.hangover_ms * f64::from(sample_rate) / 1000.0).round() as u64,
        lookback: lookback(stages, gated),
    })
}

fn resolve_stage(
    stage: &StageDecl,
    info: &ModelInfo,
    (reads_audio, last): (bool, bool),
    frame_len: usize,
    sample_rate: u32,
) -> Result<StageLayout, String> {
    let names = |specs: &[crate::runtime::TensorSpec]| {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        names.join(", ")
    };
    let input = |name: &str| {
        info.inputs
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                format!(
                    "the model has no input '{name}' (its inputs: {})",
                    names(&info.inputs)
                )
            })
    };
    let output = |name: &str| {
        info.outputs
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                format!(
                    "the model has no output '{name}' (its outputs: {})",
                    names(&info.outputs)
                )
            })
    };
    // The shape of one row (the batch axis at 1), the elements it holds (0: some dimension
    // is open), and the batch axis.
    let fp32_row_shape =
        |index: usize, is_input: bool| -> Result<(Vec<i64>, usize, usize), String> {
            let (spec, axis) = if is_input {
                (&info.inputs[index], &info.input_axes[index])
            } else {
                (&info.outputs[index], &info.output_axes[index])
            };
            if spec.datatype != DataType::Fp32 {
                return Err(format!("'{}' must be FP32", spec.name));
            }
            let BatchAxis::Axis(axis) = *axis else {
                return Err(format!("'{}' must have a batch axis", spec.name));
            };
            let mut shape = spec.shape.clone();
            if axis >= shape.len() {
                return Err(format!("'{}' has no axis {axis} to batch on", spec.name));
            }
            shape[axis] = 1;
            let fixed = shape.iter().all(|&d| d >= 1);
            Ok((
                shape.clone(),
                if fixed {
                    shape.iter().product::<i64>() as usize
                } else {
                    0
                },
                axis,
            ))
        };

    let w = &stage.input;
    let (window, hop) = if reads_audio {
        audio_window(w, sample_rate)?
    } else {
        (w.window.unwrap_or(0), w.hop.unwrap_or(0))
    };
    let window_input = input(&w.tensor)?;
    let (mut window_shape, fixed_len, batch_axis) = fp32_row_shape(window_input, true)?;
    let window_len = window
        .checked_mul(frame_len)
        .filter(|&n| n <= MAX_WINDOW_ELEMENTS)
        .ok_or_else(|| {
            format!(
                "a window of {window} frames of {frame_len} is over {MAX_WINDOW_ELEMENTS} values"
            )
        })?;
    if fixed_len != window_len {
        // A [batch, n] input whose n the file leaves open (or the manifest declares per
        // rate, as Silero's): the window goes in flat. Whether the model takes that n is
        // checked below, on a whole step.
        if window_shape.len() != 2 {
            return Err(format!(
                "input '{}' of shape {:?} cannot take a window of {window} frames of {frame_len}",
                w.tensor, info.inputs[window_input].shape
            ));
        }
        window_shape[1 - batch_axis] = window_len as i64;
    }
    let output_index = output(&stage.output.tensor)?;
    let (_, out_len, _) = fp32_row_shape(output_index, false)?;
    let frames_out = stage.output.frames;
    // The last stage's output is read for its first value: its size may be left open.
    let open_ok = last && frames_out == 1;
    if (out_len == 0 && !open_ok) || !out_len.is_multiple_of(frames_out) {
        return Err(format!(
            "output '{}' must have fixed dimensions that divide into {frames_out} frames",
            stage.output.tensor
        ));
    }
    let mut recurrent = Vec::new();
    for (input_name, output_name) in &stage.state {
        let input_index = input(input_name)?;
        let (shape, len, _) = fp32_row_shape(input_index, true)?;
        let output_index = output(output_name)?;
        // ONNX files often leave the output's dimensions open; its size is checked per step.
        let (_, out, _) = fp32_row_shape(output_index, false)?;
        if len == 0 || (out != 0 && out != len) {
            return Err(format!(
                "state '{input_name}' must have fixed dimensions, and '{output_name}' its size"
            ));
        }
        recurrent.push(Recurrent {
            input: input_index,
            output: output_index,
            shape,
            len,
        });
    }
    let mut constants = Vec::new();
    for (name, value) in &stage.constants {
        let index = input(name)?;
        let spec = &info.inputs[index];
        let value = match value {
            ConstantDecl::Number(n) => *n,
            ConstantDecl::SampleRate => f64::from(sample_rate),
        };
        let shape: Vec<i64> = spec.shape.iter().map(|&d| d.max(1)).collect();
        let n = shape.iter().product::<i64>() as usize;
        let data = match spec.datatype {
            DataType::Int64 => TensorData::Int64(vec![value as i64; n]),
            DataType::Int32 => TensorData::Int32(vec![value as i32; n]),
            DataType::Fp32 => TensorData::Fp32(vec![value as f32; n]),
            DataType::Fp64 => TensorData::Fp64(vec![value; n]),
            other => return Err(format!("constant '{name}' cannot be {other}")),
        };
        constants.push((index, shape, data));
    }
    let covered = 1 + recurrent.len() + constants.len();
    if covered != info.inputs.len() {
        return Err(format!(
            "the model has {} inputs; the declaration feeds {covered} (window, state, constants)",
            info.inputs.len()
        ));
    }
    let layout = StageLayout {
        model: info.name.clone(),
        input_names: info.inputs.iter().map(|s| s.name.clone()).collect(),
        window_input,
        window_shape,
        window,
        hop,
        prefill: w.prefill.unwrap_or(window - hop),
        pad: w.pad,
        frame_len,
        output: output_index,
        frames_out,
        out_frame_len: out_len / frames_out,
        recurrent,
        constants,
    };
    check_step(&layout, info, sample_rate)?;
    Ok(layout)
}

/// The stage's first step, checked as the model checks any request: its input shapes (the
/// file's, or those the manifest declares, paired with a value: Silero takes 576 samples
/// with `sr` 16000 and 288 with 8000), values and finite floats. A window, sample rate or
/// `pad` the model cannot take is refused here, when the model loads (a stream of one
/// stage) or when a stream starts, rather than failing the stream's first step. (Stream
/// steps are not validated again on their way to the model.)
fn check_step(s: &StageLayout, info: &ModelInfo, sample_rate: u32) -> Result<(), String> {
    let window = vec![s.pad; s.window * s.frame_len];
    let states: Vec<Vec<f32>> = s.recurrent.iter().map(|r| vec![0.0; r.len]).collect();
    info.validate(s.inputs(window, &states), None)
        .map(drop)
        .map_err(|e| format!("at {sample_rate} Hz the model would refuse its steps: {e}"))
}

impl StageLayout {
    /// One step's inputs, in the model's order: `window` (the stage's window, flat), the
    /// recurrent `states`, and the constants.
    pub(super) fn inputs(&self, window: Vec<f32>, states: &[Vec<f32>]) -> Vec<NamedTensor> {
        let mut inputs: Vec<NamedTensor> = self
            .input_names
            .iter()
            .map(|name| NamedTensor {
                name: name.clone(),
                shape: Vec::new(),
                data: TensorData::Fp32(Vec::new()),
            })
            .collect();
        inputs[self.window_input].shape = self.window_shape.clone();
        inputs[self.window_input].data = TensorData::Fp32(window);
        for (r, state) in self.recurrent.iter().zip(states) {
            inputs[r.input].shape = r.shape.clone();
            inputs[r.input].data = TensorData::Fp32(state.clone());
        }
        for (index, shape, data) in &self.constants {
            inputs[*index].shape = shape.clone();
            inputs[*index].data = data.clone();
        }
        inputs
    }

    /// The outputs a step asks for: the result, then each recurrent state's.
    pub(super) fn outputs(&self) -> Vec<usize> {
        let mut outputs = vec![self.output];
        outputs.extend(self.recurrent.iter().map(|r| r.output));
        outputs
    }
}

/// The gate at one sample rate.
#[derive(Clone, Debug)]
pub struct GateLayout {
    /// The voice activity model's one stage: it reads the audio.
    pub stage: StageLayout,
    /// The gated stage's index in the stream's stages.
    pub gated: usize,
    pub threshold: f32,
    /// In samples.
    pub hangover: u64,
    pub lookback: u64,
}

/// Audio samples the later stages' windows look back over: for each stage after `gated`,
/// `window - 1` of its input frames, at the audio each frame stands for.
fn lookback(stages: &[StageLayout], gated: usize) -> u64 {
    let mut per_frame = 1.0_f64; // samples of audio per input frame
    let mut total = 0.0;
    for (i, s) in stages.iter().enumerate() {
        if i > gated {
            total += (s.window - 1) as f64 * per_frame;
        }
        per_frame = per_frame * s.hop as f64 / s.frames_out as f64;
    }
    total.ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::pipeline::tests::{chain, gated_chain, silero};

    #[test]
    fn a_declaration_is_checked_against_its_models_at_every_rate() {
        // Silero alone: no other model; a rate its input rules refuse names the rate.
        let mut decl = StreamDecl::silero_vad();
        let vad = silero();
        assert!(check_declaration(&decl, &vad, &[]).is_ok());
        decl.sample_rates.push(48000);
        let err = check_declaration(&decl, &vad, &[]).unwrap_err();
        assert!(err.contains("at 48000 Hz"), "{err}");

        // The chain, gated: its stages' models, then its gate's.
        let (decl, models) = gated_chain();
        assert_eq!(declared_models(&decl), ["feat", "emb", "gate"]);
        let [feat, emb, kw, gate] = [&models[0], &models[1], &models[2], &models[3]];
        assert!(check_declaration(&decl, kw, &[feat, emb, gate]).is_ok());
        // A stage's output the model does not have: the stage, its manifest key, and the
        // names the model has.
        let (mut wrong, _) = gated_chain();
        wrong.stages[1].output.tensor = "embedding".into();
        let err = check_declaration(&wrong, kw, &[feat, emb, gate]).unwrap_err();
        assert!(
            err.contains(
                "stream stage 1 (emb): the model has no output 'embedding' (its outputs: emb)"
            ) && err.contains("declared at [models.stream] stages[1]"),
            "{err}"
        );
        // The declaring model's own input.
        let (mut wrong, _) = gated_chain();
        wrong.input.tensor = "embeddings".into();
        let err = check_declaration(&wrong, kw, &[feat, emb, gate]).unwrap_err();
        assert!(
            err.contains("stage 2 (kw): the model has no input 'embeddings'")
                && err.contains("declared at [models.stream] of 'kw'"),
            "{err}"
        );
        // A gate that does not hear the stream's rate.
        let mut deaf = gate.clone();
        let mut its_stream = (**deaf.stream.as_ref().unwrap()).clone();
        its_stream.sample_rates = vec![2000];
        deaf.stream = Some(std::sync::Arc::new(its_stream));
        let err = check_declaration(&decl, kw, &[feat, emb, &deaf]).unwrap_err();
        assert!(
            err.contains("stream gate (gate): it does not take 1000 Hz")
                && err.contains("[models.stream.gate]"),
            "{err}"
        );
        // Models missing, or given in another order than the declaration's.
        let err = check_declaration(&decl, kw, &[feat, emb]).unwrap_err();
        assert!(err.contains("names 3 models besides 'kw'"), "{err}");
        let err = check_declaration(&decl, kw, &[emb, feat, gate]).unwrap_err();
        assert!(err.contains("stream stage 0 is 'feat'"), "{err}");
        let err = check_declaration(&decl, kw, &[feat, emb, feat]).unwrap_err();
        assert!(err.contains("the stream's gate is 'gate'"), "{err}");

        // Ungated, the chain needs no gate.
        let (decl, models) = chain();
        assert!(check_declaration(&decl, &models[2], &[&models[0], &models[1]]).is_ok());
    }
}
