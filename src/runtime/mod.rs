//! The only code that touches ONNX Runtime (`ort`): finding and loading the shared library,
//! and [`ModelSession`], one loaded model on one device.
//!
//! Workers do not see `ort` either: they run an [`InferenceSession`] that a [`SessionLoader`]
//! made. In the server that is ONNX Runtime ([`ort_sessions`]); in unit tests of the router and
//! the supervisor it is one of the [`doubles`] (echo, panic, hang, slow), which need no
//! library and no model file.

pub mod doubles;
mod session;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use session::{short_reason, ModelSession, RunError, TensorSpec};

use crate::manifest::{Device, ModelEntry};
use crate::tensor::{NamedTensor, TensorData};

/// One loaded model that one worker runs, on one thread.
pub trait InferenceSession: Send {
    /// The inputs as the model declares them, in the order `run` takes them.
    fn inputs(&self) -> &[TensorSpec];
    /// The outputs as the model declares them, in the order `run` returns them.
    fn outputs(&self) -> &[TensorSpec];
    /// Where it runs (CPU where a GPU was asked for and the manifest allowed falling back).
    fn device(&self) -> Device;
    /// Runs the model on inputs in the model's input order, borrowing their data; returns every
    /// output in the model's output order.
    fn run(&mut self, inputs: &[(&[i64], &TensorData)]) -> Result<Vec<NamedTensor>, RunError>;
}

/// Makes the session of one replica of a model version (called on the worker's own thread).
pub trait SessionLoader: Send + Sync {
    fn load(&self, entry: &ModelEntry) -> Result<Box<dyn InferenceSession>, String>;
}

/// The loader every worker of a server uses: one per process, so a plain reference.
pub type Sessions = &'static dyn SessionLoader;

impl InferenceSession for ModelSession {
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
        self.run_classified(inputs)
    }
}

struct OrtLoader(&'static ort::environment::Environment);

impl SessionLoader for OrtLoader {
    fn load(&self, entry: &ModelEntry) -> Result<Box<dyn InferenceSession>, String> {
        let session = ModelSession::load(
            self.0,
            &entry.file,
            entry.device,
            entry.allow_cpu_fallback,
            entry.intra_threads,
        )?;
        Ok(Box::new(session))
    }
}

static ORT_LOADER: OnceLock<OrtLoader> = OnceLock::new();

/// ONNX Runtime sessions: loads the library first ([`init`]), once per process.
pub fn ort_sessions(explicit: Option<&Path>) -> Result<Sessions, String> {
    let env = init(explicit)?;
    Ok(ORT_LOADER.get_or_init(|| OrtLoader(env)))
}

/// The ONNX Runtime version whose C API this build is compiled against (`ort` feature api-31).
pub const ORT_VERSION: &str = "1.31.1";

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads `libonnxruntime` once per process and creates the global ORT environment. Later
/// calls return the first outcome, whatever path they pass.
pub fn init(explicit: Option<&Path>) -> Result<&'static ort::environment::Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = find_dylib(explicit)?;
            tracing::info!(path = %path.display(), "loading ONNX Runtime");
            let builder = ort::init_from(&path)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?;
            builder
                .with_name("streamserve")
                .with_telemetry(false)
                .build()
                .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Where `libonnxruntime` is: the explicit path (flag, config or `ORT_DYLIB_PATH`), else the
/// wheel that the project's setup script installed into `.venv`, looked for beside the
/// working directory and beside the executable.
pub fn find_dylib(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!(
                "ONNX Runtime library {} (from --ort-dylib / ORT_DYLIB_PATH) does not exist",
                path.display()
            ))
        };
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return find_dylib(Some(Path::new(&path)));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/release/streamserve -> the checkout root is two levels up.
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    let mut searched = Vec::new();
    for root in &roots {
        let lib_dir = root.join(".venv").join("lib");
        searched.push(lib_dir.display().to_string());
        if let Some(found) = find_in_venv(&lib_dir) {
            return Ok(found);
        }
    }
    for system in [
        "/usr/local/lib/libonnxruntime.so",
        "/usr/lib/libonnxruntime.so",
    ] {
        searched.push(system.to_string());
        if Path::new(system).is_file() {
            return Ok(PathBuf::from(system));
        }
    }
    Err(format!(
        "cannot find libonnxruntime. Searched: {}. Fix: run `bash scripts/setup.sh` (installs the \
         onnxruntime=={ORT_VERSION} wheel into .venv), or `pip install onnxruntime=={ORT_VERSION}` and set \
         ORT_DYLIB_PATH to its onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}",
        searched.join(", ")
    ))
}

fn find_in_venv(lib_dir: &Path) -> Option<PathBuf> {
    let pythons = std::fs::read_dir(lib_dir).ok()?;
    for python in pythons.flatten() {
        let capi = python
            .path()
            .join("site-packages")
            .join("onnxruntime")
            .join("capi");
        let Ok(files) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut libs: Vec<PathBuf> = files
            .flatten()
            .map(|f| f.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        libs.sort();
        if let Some(lib) = libs.pop() {
            return Some(lib);
        }
    }
    None
}

/// Whether this ONNX Runtime build can run the CUDA execution provider at all.
pub fn cuda_available() -> bool {
    use ort::ep::ExecutionProvider;
    ort::ep::CUDA::is_available().unwrap_or(false)
}

/// Opens a model file on the CPU to read the inputs and outputs it declares (what
/// `registry push` records), proving on the way that ONNX Runtime can load it.
pub fn inspect(
    explicit: Option<&Path>,
    file: &Path,
) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), String> {
    let env = init(explicit)?;
    let session = ModelSession::load(env, file, Device::Cpu, false, 1)?;
    Ok((session.inputs.clone(), session.outputs.clone()))
}
