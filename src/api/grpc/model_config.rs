//! A served version's configuration in the shape of Triton's `ModelConfig` (what
//! `ModelConfig` answers and Triton's tools read): the same facts as REST's
//! `/v2/models/{name}/config`, with the batch axis left out of the dims when batching is on.

use super::proto::inference::model_instance_group::Kind;
use super::proto::inference::{
    model_config::SchedulingChoice, DataType as ConfigType, ModelConfig, ModelDynamicBatching,
    ModelInput, ModelInstanceGroup, ModelOutput, ModelQueuePolicy,
};
use crate::api::kserve::config_dims;
use crate::manifest::{BatchAxis, Device};
use crate::model::{ModelInfo, PLATFORM};
use crate::runtime::TensorSpec;

fn data_type(spec: &TensorSpec) -> i32 {
    ConfigType::from_str_name(&format!("TYPE_{}", spec.datatype)).unwrap_or(ConfigType::TypeInvalid)
        as i32
}

pub fn model_config(info: &ModelInfo) -> ModelConfig {
    let dims = |spec: &TensorSpec, axis: &BatchAxis| config_dims(info, &spec.shape, axis);
    let (kind, gpus) = match info.device {
        Device::Cpu => (Kind::Cpu, vec![]),
        Device::Cuda(n) => (Kind::Gpu, vec![n]),
    };
    let batching = info.batched().then(|| {
        SchedulingChoice::DynamicBatching(ModelDynamicBatching {
            max_queue_delay_microseconds: info.batching.max_queue_delay.as_micros() as u64,
            default_queue_policy: Some(ModelQueuePolicy {
                max_queue_size: u32::try_from(info.max_queue).unwrap_or(u32::MAX),
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    ModelConfig {
        name: info.name.clone(),
        platform: PLATFORM.into(),
        backend: "onnxruntime".into(),
        max_batch_size: i32::try_from(info.batching.max_batch_size).unwrap_or(i32::MAX),
        input: info
            .inputs
            .iter()
            .zip(&info.input_axes)
            .map(|(spec, axis)| ModelInput {
                name: spec.name.clone(),
                data_type: data_type(spec),
                dims: dims(spec, axis),
                ..Default::default()
            })
            .collect(),
        output: info
            .outputs
            .iter()
            .zip(&info.output_axes)
            .map(|(spec, axis)| ModelOutput {
                name: spec.name.clone(),
                data_type: data_type(spec),
                dims: dims(spec, axis),
                ..Default::default()
            })
            .collect(),
        instance_group: vec![ModelInstanceGroup {
            name: format!("{}_{}", info.name, info.version),
            kind: kind as i32,
            // Configured, as REST's config and Triton's: the manifest's `replicas`; the count
            // running now is the metadata's and the status page's.
            count: i32::try_from(info.replicas).unwrap_or(i32::MAX),
            gpus,
            ..Default::default()
        }],
        scheduling_choice: batching,
        ..Default::default()
    }
}
