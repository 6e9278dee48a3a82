//! The keyword pipeline's compute limit: each of its models alone in-process (a
//! `ModelSession`, intra_threads 1, no server) on random rows at a few batch sizes, and from the
//! µs per row the CPU one real-time stream needs per second for its model calls alone.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use streamserve::tensor::TensorData;

use super::{GATE, MODEL};
use crate::bench::in_process;
use crate::stream_steps::ratio;
use crate::streams_bench::{measure_vad, STEPS_PER_STREAM_SEC};
use crate::sysinfo::CpuShare;
use crate::SplitMix64;

/// Batch sizes of the in-process measurement.
pub const CEILING_BATCHES: [usize; 3] = [1, 16, 64];

/// One model of the pipeline: its one input (a row's shape, the batch axis first), its output,
/// and the steps one real-time 16 kHz stream needs per second.
pub struct Stage {
    pub model: &'static str,
    pub role: &'static str,
    pub input: &'static str,
    pub row: &'static [i64],
    pub output: &'static str,
    pub steps_per_stream_s: f64,
}

/// The stages in order (one step per 80 ms each), then the gate (one per 32 ms).
pub const STAGES: [Stage; 4] = [
    Stage {
        model: "ww_melspec",
        role: "mel front end",
        input: "audio",
        row: &[1760],
        output: "mel",
        steps_per_stream_s: 12.5,
    },
    Stage {
        model: "ww_embedding",
        role: "speech embedding",
        input: "input_1",
        row: &[76, 32, 1],
        output: "conv2d_19",
        steps_per_stream_s: 12.5,
    },
    Stage {
        model: MODEL,
        role: "keyword head",
        input: "embeddings",
        row: &[16, 96],
        output: "score",
        steps_per_stream_s: 12.5,
    },
    Stage {
        model: GATE,
        role: "gate (VAD)",
        input: "input",
        row: &[576],
        output: "output",
        steps_per_stream_s: STEPS_PER_STREAM_SEC,
    },
];

/// One model alone in-process at one batch size.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageCost {
    pub model: &'static str,
    pub role: &'static str,
    pub batch: usize,
    pub calls: u64,
    pub mean_call_ms: f64,
    pub us_per_row: f64,
    /// CPU ms one real-time stream needs per second of this model at this batch size.
    pub ms_per_stream_s: f64,
    pub cpu_cores: Option<CpuShare>,
}

/// [`StageCost`] of `stage` at `batch`: one thread, one session, random rows.
pub fn measure_stage(
    stage: &Stage,
    file: &Path,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<StageCost> {
    let warm = Duration::from_millis(300);
    let (calls, mean_call_ms, cpu_cores) = if stage.model == GATE {
        let c = measure_vad(file, 1, batch, warm, duration)?;
        (c.calls, c.mean_call_ms, c.cpu_cores)
    } else {
        let row = stage.row.iter().product::<i64>() as usize;
        let shape: Vec<i64> = std::iter::once(batch as i64)
            .chain(stage.row.iter().copied())
            .collect();
        let inputs = |session: &streamserve::runtime::ModelSession, t: usize| {
            let names: Vec<&str> = session.inputs.iter().map(|s| s.name.as_str()).collect();
            if names != [stage.input] {
                return Err(format!(
                    "{} has inputs {names:?}, not [{:?}]",
                    stage.model, stage.input
                ));
            }
            let data = SplitMix64::new(0x4B57 + t as u64).f32_vec(batch * row);
            Ok(vec![(shape.clone(), TensorData::Fp32(data))])
        };
        let check = |outputs: &[streamserve::tensor::NamedTensor]| match outputs
            .iter()
            .find(|o| o.name == stage.output)
        {
            Some(o) if o.shape.first() == Some(&(batch as i64)) => Ok(()),
            Some(o) => Err(format!(
                "{}: {} has shape {:?}",
                stage.model, stage.output, o.shape
            )),
            None => Err(format!("{} has no output {}", stage.model, stage.output)),
        };
        let c = in_process(file, (1, batch), (warm, duration), inputs, check)?;
        (c.calls, c.mean_call_ms, c.cpu_cores)
    };
    let us_per_row = mean_call_ms * 1000.0 / batch as f64;
    Ok(StageCost {
        model: stage.model,
        role: stage.role,
        batch,
        calls,
        mean_call_ms,
        us_per_row,
        ms_per_stream_s: us_per_row * stage.steps_per_stream_s / 1000.0,
        cpu_cores,
    })
}

/// CPU ms per real-time stream-second of the model calls alone, and the streams that makes per
/// core and on `nproc` cores, with the gate (`gated`) or without, at batch 1 or each model's
/// best batch size.
pub fn compute_limit(costs: &[StageCost], gated: bool, best: bool, nproc: usize) -> Value {
    let ms: f64 = STAGES
        .iter()
        .filter(|s| gated || s.model != GATE)
        .filter_map(|s| {
            let of_model = costs.iter().filter(|c| c.model == s.model);
            if best {
                of_model.map(|c| c.ms_per_stream_s).min_by(f64::total_cmp)
            } else {
                of_model
                    .filter(|c| c.batch == 1)
                    .map(|c| c.ms_per_stream_s)
                    .next()
            }
        })
        .sum();
    let per_core = ratio(1000.0, ms).unwrap_or(0.0);
    json!({ "gated": gated, "best_batch": best, "cpu_ms_per_stream_s": ms,
            "streams_per_core": per_core, "streams_on_all_cores": per_core * nproc as f64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compute_limit_adds_up_the_stages() {
        let cost = |model, batch, us: f64| {
            let steps = STAGES
                .iter()
                .find(|s| s.model == model)
                .unwrap()
                .steps_per_stream_s;
            StageCost {
                model,
                role: "",
                batch,
                calls: 1,
                mean_call_ms: 0.0,
                us_per_row: us,
                ms_per_stream_s: us * steps / 1000.0,
                cpu_cores: None,
            }
        };
        let costs = [
            cost("ww_melspec", 1, 80.0),
            cost("ww_embedding", 1, 1000.0),
            cost("ww_embedding", 16, 800.0),
            cost(MODEL, 1, 40.0),
            cost(GATE, 1, 32.0),
        ];
        let b1 = compute_limit(&costs, false, false, 2);
        assert!((b1["cpu_ms_per_stream_s"].as_f64().unwrap() - 12.5 * 1.12).abs() < 1e-9);
        let best = compute_limit(&costs, false, true, 2);
        assert!((best["cpu_ms_per_stream_s"].as_f64().unwrap() - 12.5 * 0.92).abs() < 1e-9);
        let gated = compute_limit(&costs, true, false, 2);
        assert!((gated["cpu_ms_per_stream_s"].as_f64().unwrap() - (14.0 + 1.0)).abs() < 1e-9);
        assert!((gated["streams_on_all_cores"].as_f64().unwrap() - 2000.0 / 15.0).abs() < 1e-9);
    }
}
