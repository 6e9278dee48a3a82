//! One ONNX Runtime session ([`ModelSession`]): loading a model file on a device, running it
//! on borrowed input buffers, and telling why a run failed ([`RunError`]).

use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};
use serde::Serialize;

use crate::manifest::Device;
use crate::tensor::{DataType, NamedTensor, TensorData};
use crate::with_element_type;

/// A model input or output as the model declares it; `-1` marks a dynamic dimension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// Why a model call failed.
#[derive(Clone, Debug)]
pub struct RunError {
    /// ONNX Runtime's message, whole (for logs).
    pub message: String,
    /// ONNX Runtime answered `INVALID_ARGUMENT`: a kernel refused the inputs' shapes or values
    /// (the request's doing), rather than failing to run (`FAIL`, `RUNTIME_EXCEPTION`,
    /// `EP_FAIL`: the runtime's or the device's).
    pub invalid_input: bool,
}

impl RunError {
    fn internal(message: String) -> RunError {
        RunError {
            message,
            invalid_input: false,
        }
    }

    /// A one-line reason fit for a client; see [`short_reason`].
    pub fn reason(&self) -> String {
        short_reason(&self.message)
    }
}

/// A one-line reason from an ONNX Runtime message. Those nest ("Non-zero status code returned
/// while running If node. Name:'If_0' Status Message: ... running LSTM node ... Status
/// Message: Input X must have 3 dimensions only"), and kernel checks start with the source
/// file and the C++ function; what a client can act on is the innermost node and its
/// complaint.
pub fn short_reason(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default().trim();
    let node = line
        .rfind("while running ")
        .and_then(|i| line[i + "while running ".len()..].split(" node").next());
    let mut tail = line
        .rsplit("Status Message: ")
        .next()
        .unwrap_or(line)
        .trim();
    // ORT_ENFORCE: "/path/file.h:47 ns::Class::fn(args) condition was false. The reason."
    if let Some(i) = tail.find(" was false. ") {
        tail = &tail[i + " was false. ".len()..];
    } else if tail
        .split(' ')
        .next()
        .is_some_and(|t| t.contains(".cc:") || t.contains(".h:"))
    {
        tail = tail.find(") ").map_or("", |i| &tail[i + 2..]);
    }
    let tail: String = tail.chars().take(240).collect();
    match node {
        Some(node) if !tail.is_empty() => format!("{node} node: {tail}"),
        Some(node) => format!("{node} node failed"),
        None if tail.is_empty() => "the model call failed".into(),
        None => tail,
    }
}

/// One ONNX Runtime session on one device. Not shared between threads: each worker owns one.
pub struct ModelSession {
    session: Session,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// The device the session actually runs on (CPU where a GPU was asked for and the manifest
    /// allowed falling back).
    pub device: Device,
}

impl ModelSession {
    pub fn load(
        env: &ort::environment::Environment,
        path: &Path,
        device: Device,
        allow_cpu_fallback: bool,
        intra_threads: usize,
    ) -> Result<ModelSession, String> {
        match device {
            Device::Cpu => Self::load_on(env, path, Device::Cpu, intra_threads),
            Device::Cuda(index) => match Self::load_on(env, path, device, intra_threads) {
                Ok(session) => Ok(session),
                Err(reason) if allow_cpu_fallback => {
                    tracing::warn!(model = %path.display(), %reason, "cuda:{index} unusable, falling back to CPU as the manifest allows");
                    Self::load_on(env, path, Device::Cpu, intra_threads)
                }
                Err(reason) => Err(reason),
            },
        }
    }

    fn load_on(
        env: &ort::environment::Environment,
        path: &Path,
        device: Device,
        intra_threads: usize,
    ) -> Result<ModelSession, String> {
        let mut builder = Session::builder(env)
            .map_err(|e| e.to_string())?
            .with_intra_threads(intra_threads)
            .map_err(|e| e.to_string())?;
        if let Device::Cuda(index) = device {
            if !super::cuda_available() {
                return Err(format!(
                    "{device} requested, but this ONNX Runtime build has no CUDA execution provider \
                     (install the onnxruntime-gpu wheel on a host with an NVIDIA GPU, CUDA 13 and cuDNN 9)"
                ));
            }
            let cuda = ort::ep::CUDA::default()
                .with_device_id(index)
                .build()
                .error_on_failure();
            builder = builder.with_execution_providers([cuda]).map_err(|e| {
                format!("cannot start the CUDA execution provider on {device}: {e}")
            })?;
        }
        let session = builder
            .commit_from_file(path)
            .map_err(|e| format!("ONNX Runtime cannot load {}: {e}", path.display()))?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ModelSession {
            session,
            inputs,
            outputs,
            device,
        })
    }

    /// Runs the model on inputs given in the model's input order, borrowing their data (no
    /// copy on the way in), and returns every output in the model's output order.
    pub fn run(&mut self, inputs: &[(&[i64], &TensorData)]) -> Result<Vec<NamedTensor>, String> {
        self.run_classified(inputs).map_err(|e| e.message)
    }

    /// [`ModelSession::run`], saying whether a failure was the inputs' doing.
    pub fn run_classified(
        &mut self,
        inputs: &[(&[i64], &TensorData)],
    ) -> Result<Vec<NamedTensor>, RunError> {
        let mut values: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (spec, (shape, data)) in self.inputs.iter().zip(inputs) {
            let value: SessionInputValue<'_> = crate::with_tensor_data!(*data, v => {
                TensorRef::from_array_view((shape.to_vec(), v.as_slice()))
                    .map_err(|e| RunError::internal(format!("input '{}': {e}", spec.name)))?
                    .into()
            });
            values.push((spec.name.as_str(), value));
        }
        let outputs = self.session.run(values).map_err(|e| RunError {
            invalid_input: e.code() == ort::error::ErrorCode::InvalidArgument,
            message: e.to_string(),
        })?;
        self.outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(spec.name.as_str()).ok_or_else(|| {
                    RunError::internal(format!("model produced no output '{}'", spec.name))
                })?;
                extract(&spec.name, spec.datatype, value).map_err(RunError::internal)
            })
            .collect()
    }
}

fn extract(name: &str, datatype: DataType, value: &DynValue) -> Result<NamedTensor, String> {
    with_element_type!(datatype, T, Wrap => {
        let (shape, data) = value
            .try_extract_tensor::<T>()
            .map_err(|e| format!("output '{name}': {e}"))?;
        Ok(NamedTensor { name: name.to_string(), shape: shape.to_vec(), data: Wrap(data.to_vec()) })
    })
}

fn spec(name: &str, dtype: &ValueType) -> Result<TensorSpec, String> {
    let ValueType::Tensor { ty, shape, .. } = dtype else {
        return Err(format!(
            "'{name}' is not a tensor ({dtype:?}); streamserve serves tensor models only"
        ));
    };
    let datatype = match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        other => {
            return Err(format!(
                "'{name}' has element type {other:?}, which streamserve does not serve yet"
            ))
        }
    };
    Ok(TensorSpec {
        name: name.to_string(),
        datatype,
        shape: shape.iter().copied().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reasons_keep_the_innermost_node_and_complaint() {
        let nested = "Non-zero status code returned while running If node. Name:'If_0' Status Message: \
            Non-zero status code returned while running LSTM node. Name:'If_0_else_branch__Inline_0__/decoder/rnn/LSTM' \
            Status Message: Input X must have 3 dimensions only. Actual:{1,1,1,128,2}";
        assert_eq!(
            short_reason(nested),
            "LSTM node: Input X must have 3 dimensions only. Actual:{1,1,1,128,2}"
        );
        let enforce = "Non-zero status code returned while running Reshape node. Name:'/Reshape' Status Message: \
            /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/reshape_helper.h:47 \
            onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, onnxruntime::TensorShapeVector&, bool) \
            input_shape_size == size was false. The input tensor cannot be reshaped to the requested shape. Input shape:{1,3}\n\
            Stacktrace:\n#0 somewhere";
        assert_eq!(
            short_reason(enforce),
            "Reshape node: The input tensor cannot be reshaped to the requested shape. Input shape:{1,3}"
        );
        let path = "/src/onnxruntime/core/framework/op_kernel.cc:83 virtual OrtValue* onnxruntime::OpKernelContext::OutputMLValue(int, const onnxruntime::TensorShape&) shape.Size() overflow";
        assert_eq!(short_reason(path), "shape.Size() overflow");
        assert_eq!(short_reason("plain\nsecond"), "plain");
        assert!(short_reason(&"x".repeat(10_000)).len() <= 240);
    }
}
