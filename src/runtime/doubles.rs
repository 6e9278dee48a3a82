//! Test doubles of a model session, so that the router's and the supervisor's logic can be
//! unit-tested in milliseconds, without ONNX Runtime or a model file: a [`DoubleLoader`] makes
//! sessions of one FP32 input `x [batch, 4]` and one output `y [batch, 4]` that echo, panic,
//! hang or run slowly, as its shared [`Behaviour`] says at the time of each call (a test can
//! change it while the workers run), and it records the rows of every model call.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{InferenceSession, RunError, SessionLoader, TensorSpec};
use crate::manifest::{Device, ModelEntry};
use crate::tensor::{DataType, NamedTensor, TensorData};

/// What a double session does on its next call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers each input back as the output.
    Echo,
    /// Panics inside the call (as a crashing kernel would).
    Panic,
    /// Sleeps this long, then echoes (a hang, when longer than the model's `hang_timeout_ms`).
    Sleep(Duration),
    /// Fails the call with an error that is not the input's doing.
    Fail,
}

/// Makes double sessions that share one behaviour and one call log.
#[derive(Clone)]
pub struct DoubleLoader {
    behaviour: Arc<Mutex<Behaviour>>,
    calls: Arc<Mutex<Vec<usize>>>,
    /// When set, loading fails with this reason.
    load_error: Arc<Mutex<Option<String>>>,
}

impl DoubleLoader {
    pub fn new(behaviour: Behaviour) -> DoubleLoader {
        DoubleLoader {
            behaviour: Arc::new(Mutex::new(behaviour)),
            calls: Arc::default(),
            load_error: Arc::default(),
        }
    }

    /// A loader for the life of the process, as workers take it (`Sessions`).
    pub fn leak(self) -> &'static DoubleLoader {
        Box::leak(Box::new(self))
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap_or_else(|e| e.into_inner()) = behaviour;
    }

    pub fn fail_loads(&self, reason: Option<&str>) {
        *self.load_error.lock().unwrap_or_else(|e| e.into_inner()) = reason.map(str::to_string);
    }

    /// The rows of every model call so far, in order.
    pub fn calls(&self) -> Vec<usize> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The interface of every double session.
    pub fn interface() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 4],
        };
        (vec![spec("x")], vec![spec("y")])
    }
}

impl SessionLoader for DoubleLoader {
    fn load(&self, entry: &ModelEntry) -> Result<Box<dyn InferenceSession>, String> {
        if let Some(reason) = self
            .load_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(reason);
        }
        let (inputs, outputs) = DoubleLoader::interface();
        Ok(Box::new(DoubleSession {
            loader: self.clone(),
            inputs,
            outputs,
            device: entry.device,
        }))
    }
}

struct DoubleSession {
    loader: DoubleLoader,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    device: Device,
}

impl InferenceSession for DoubleSession {
    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn device(&self) -> Device {
        self.device
    }

    fn run(&mut self, inputs: &[(&[i64], &TensorData)]) -> Result<Vec<NamedTensor>, RunError> {
        let rows = inputs
            .first()
            .and_then(|(shape, _)| shape.first())
            .map_or(0, |&d| d as usize);
        self.loader
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rows);
        let behaviour = *self
            .loader
            .behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match behaviour {
            Behaviour::Echo => {}
            Behaviour::Panic => panic!("double session: panic"),
            Behaviour::Sleep(d) => std::thread::sleep(d),
            Behaviour::Fail => {
                return Err(RunError {
                    message: "double session: failure".into(),
                    invalid_input: false,
                })
            }
        }
        Ok(self
            .outputs
            .iter()
            .zip(inputs)
            .map(|(spec, (shape, data))| NamedTensor {
                name: spec.name.clone(),
                shape: shape.to_vec(),
                data: (*data).clone(),
            })
            .collect())
    }
}
