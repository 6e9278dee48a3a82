//! The model directory's manifest (`models.toml`): which models exist, in which versions,
//! where their files are, the sha256 each must have, and how each is served.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST_FILE: &str = "models.toml";

/// Where a model's sessions run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA GPU by index.
    Cuda(i32),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|n| *n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| format!("device must be \"cpu\" or \"cuda:N\", got \"{s}\"")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Device, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a tensor's batch dimension is when requests are stacked into one model call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchAxis {
    /// Requests are stacked along this axis (0 for most tensors; 1 for e.g. an RNN state
    /// shaped `[layers, batch, hidden]`).
    Axis(usize),
    /// Not batched: every request in a batch must carry the same value (e.g. a sample rate
    /// scalar), and outputs of this kind go to every request whole.
    Shared,
}

impl<'de> Deserialize<'de> for BatchAxis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<BatchAxis, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Axis(usize),
            Word(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Axis(n) => Ok(BatchAxis::Axis(n)),
            Raw::Word(w) if w == "shared" => Ok(BatchAxis::Shared),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "batch axis must be an axis number or \"shared\", got \"{w}\""
            ))),
        }
    }
}

/// What kind of stream a model can serve over `/v1/streams/{model}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// Voice activity detection with Silero VAD's interface (`input`, `state`, `sr` ->
    /// `output`, `stateN`).
    Vad,
}

/// When a model version is loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadPolicy {
    /// At startup (the server is ready once it is).
    #[default]
    Eager,
    /// On the first request that needs it; that request waits for the load.
    Lazy,
}

/// What the manifest declares about one model input beyond what the ONNX file says: ONNX
/// files often leave dimensions dynamic that the model really needs fixed (Silero VAD says
/// `[-1, -1]` and needs `[-1, 576]`), or take a scalar that only some values make sense for.
/// Requests are checked against it before they are queued, so that a bad one gets a 400 with
/// the reason instead of an ONNX Runtime error from inside the model.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputDecl {
    /// Shapes the input may have (`-1`: any size there); the first is the one metadata
    /// advertises. Empty: the model's own shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shapes: Vec<Vec<i64>>,
    /// Values every element must be one of. Empty: any value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<AllowedValue>,
    /// Another input whose value picks the shape: `shapes[i]` goes with its `values[i]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired_with: Option<String>,
}

/// A number from an input's `values` list, compared with tensor elements by value.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum AllowedValue {
    Int(i64),
    Float(f64),
}

impl fmt::Display for AllowedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowedValue::Int(v) => write!(f, "{v}"),
            AllowedValue::Float(v) => write!(f, "{v}"),
        }
    }
}

/// Dynamic micro-batching settings for one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Largest number of rows (requests' batch dimensions added up) in one model call.
    /// 0 means the model has no batch axis and every request runs alone, as sent.
    pub max_batch_size: usize,
    /// Longest time the oldest queued request waits for others to join its batch.
    pub max_queue_delay: Duration,
}

/// One model version as the manifest describes it, with defaults applied and its file path
/// resolved against the model directory.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub name: String,
    pub version: String,
    pub file: PathBuf,
    pub sha256: String,
    pub device: Device,
    /// Serve on CPU when the requested GPU cannot be used, instead of refusing the model.
    pub allow_cpu_fallback: bool,
    pub replicas: usize,
    /// Replica autoscaling bounds (both default to `replicas`: no autoscaling).
    pub min_replicas: usize,
    pub max_replicas: usize,
    pub intra_threads: usize,
    pub batching: Batching,
    /// Requests allowed to wait in the router's queue before new ones get 429.
    pub max_queue: usize,
    /// Latency objective for queueing: above this predicted wait the model counts as
    /// overloaded and new requests go to its fallback (if it has one).
    pub slo: Option<Duration>,
    /// A batch running longer than this means the worker is hung: it is replaced.
    pub hang_timeout: Duration,
    /// Load on the first request instead of at startup.
    pub lazy: bool,
    /// Unload after this long without a request (scale to zero); loads again on demand.
    pub idle_unload: Option<Duration>,
    pub fallback: Option<String>,
    /// Batch axis per tensor name, for tensors whose batch axis is not 0.
    pub batch_axes: BTreeMap<String, BatchAxis>,
    /// Set for models that serve WebSocket streams.
    pub stream: Option<StreamKind>,
    /// Accept NaN and infinities in float inputs (refused with 400 by default).
    pub allow_non_finite: bool,
    /// Declared constraints per input name.
    pub inputs: BTreeMap<String, InputDecl>,
    pub description: String,
    pub source: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    device: Option<Device>,
    allow_cpu_fallback: Option<bool>,
    replicas: Option<usize>,
    min_replicas: Option<usize>,
    max_replicas: Option<usize>,
    intra_threads: Option<usize>,
    max_batch_size: Option<usize>,
    max_queue_delay_ms: Option<f64>,
    max_queue: Option<usize>,
    slo_ms: Option<u64>,
    hang_timeout_ms: Option<u64>,
    load: Option<LoadPolicy>,
    idle_unload_secs: Option<u64>,
    allow_non_finite: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    version: String,
    file: PathBuf,
    sha256: String,
    // The same keys as [defaults]; spelled out because serde cannot combine `flatten` with
    // `deny_unknown_fields`, and a misspelt key must be an error, not silently ignored.
    device: Option<Device>,
    allow_cpu_fallback: Option<bool>,
    replicas: Option<usize>,
    min_replicas: Option<usize>,
    max_replicas: Option<usize>,
    intra_threads: Option<usize>,
    max_batch_size: Option<usize>,
    max_queue_delay_ms: Option<f64>,
    max_queue: Option<usize>,
    slo_ms: Option<u64>,
    hang_timeout_ms: Option<u64>,
    load: Option<LoadPolicy>,
    idle_unload_secs: Option<u64>,
    allow_non_finite: Option<bool>,
    fallback: Option<String>,
    #[serde(default)]
    batch_axes: BTreeMap<String, BatchAxis>,
    #[serde(default)]
    inputs: BTreeMap<String, InputDecl>,
    stream: Option<StreamKind>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    source: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub models: Vec<ModelEntry>,
}

impl Manifest {
    /// Reads `<dir>/models.toml`. Errors name the file and the offending key.
    pub fn load(dir: &Path) -> anyhow::Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read model manifest {}: {e} (is --models / STREAMSERVE_MODELS right?)",
                path.display()
            )
        })?;
        Manifest::parse(dir, &text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn parse(dir: &Path, text: &str) -> anyhow::Result<Manifest> {
        let raw: RawManifest = toml::from_str(text)?;
        let d = raw.defaults;
        let mut models = Vec::with_capacity(raw.models.len());
        for m in raw.models {
            let s = RawDefaults {
                device: m.device,
                allow_cpu_fallback: m.allow_cpu_fallback,
                replicas: m.replicas,
                min_replicas: m.min_replicas,
                max_replicas: m.max_replicas,
                intra_threads: m.intra_threads,
                max_batch_size: m.max_batch_size,
                max_queue_delay_ms: m.max_queue_delay_ms,
                max_queue: m.max_queue,
                slo_ms: m.slo_ms,
                hang_timeout_ms: m.hang_timeout_ms,
                load: m.load,
                idle_unload_secs: m.idle_unload_secs,
                allow_non_finite: m.allow_non_finite,
            };
            anyhow::ensure!(
                !m.name.is_empty()
                    && m.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)),
                "model name '{}' must be non-empty and use only letters, digits, '_', '-', '.'",
                m.name
            );
            anyhow::ensure!(
                m.sha256.len() == 64 && m.sha256.chars().all(|c| c.is_ascii_hexdigit()),
                "model {}:{}: sha256 must be 64 hex digits",
                m.name,
                m.version
            );
            anyhow::ensure!(
                !models
                    .iter()
                    .any(|e: &ModelEntry| e.name == m.name && e.version == m.version),
                "model {}:{} is listed twice",
                m.name,
                m.version
            );
            let delay_ms = s.max_queue_delay_ms.or(d.max_queue_delay_ms).unwrap_or(1.0);
            anyhow::ensure!(
                delay_ms.is_finite() && delay_ms >= 0.0,
                "model {}:{}: max_queue_delay_ms must be >= 0",
                m.name,
                m.version
            );
            check_input_decls(&m.inputs)
                .map_err(|e| anyhow::anyhow!("model {}:{}: {e}", m.name, m.version))?;
            models.push(ModelEntry {
                file: dir.join(&m.file),
                sha256: m.sha256.to_ascii_lowercase(),
                device: s.device.or(d.device).unwrap_or(Device::Cpu),
                allow_cpu_fallback: s
                    .allow_cpu_fallback
                    .or(d.allow_cpu_fallback)
                    .unwrap_or(false),
                replicas: s.replicas.or(d.replicas).unwrap_or(1).max(1),
                min_replicas: s.min_replicas.or(d.min_replicas).unwrap_or(0),
                max_replicas: s.max_replicas.or(d.max_replicas).unwrap_or(0),
                intra_threads: s.intra_threads.or(d.intra_threads).unwrap_or(1).max(1),
                batching: Batching {
                    max_batch_size: s.max_batch_size.or(d.max_batch_size).unwrap_or(0),
                    max_queue_delay: Duration::from_secs_f64(delay_ms / 1000.0),
                },
                max_queue: s.max_queue.or(d.max_queue).unwrap_or(1024).max(1),
                slo: s.slo_ms.or(d.slo_ms).map(Duration::from_millis),
                lazy: s.load.or(d.load).unwrap_or_default() == LoadPolicy::Lazy,
                idle_unload: s
                    .idle_unload_secs
                    .or(d.idle_unload_secs)
                    .filter(|&n| n > 0)
                    .map(Duration::from_secs),
                hang_timeout: Duration::from_millis(
                    s.hang_timeout_ms
                        .or(d.hang_timeout_ms)
                        .unwrap_or(10_000)
                        .max(10),
                ),
                fallback: m.fallback,
                batch_axes: m.batch_axes,
                stream: m.stream,
                allow_non_finite: s.allow_non_finite.or(d.allow_non_finite).unwrap_or(false),
                inputs: m.inputs,
                description: m.description,
                source: m.source,
                name: m.name,
                version: m.version,
            });
        }
        for m in &mut models {
            let (min, max) = (m.min_replicas, m.max_replicas);
            m.min_replicas = if min == 0 {
                m.replicas
            } else {
                min.min(m.replicas)
            };
            m.max_replicas = if max == 0 {
                m.replicas
            } else {
                max.max(m.replicas)
            };
        }
        for m in &models {
            if let Some(fallback) = &m.fallback {
                anyhow::ensure!(
                    models.iter().any(|e| &e.name == fallback),
                    "model {}:{} names fallback '{}', which the manifest does not list",
                    m.name,
                    m.version,
                    fallback
                );
            }
        }
        Ok(Manifest {
            dir: dir.to_path_buf(),
            models,
        })
    }
}

/// What can be checked of `inputs` declarations without the model: dimensions, non-empty
/// lists, and that a `paired_with` names a declared input with one value per shape. That the
/// declarations fit the model's inputs is checked when it loads (`rules.rs`).
fn check_input_decls(inputs: &BTreeMap<String, InputDecl>) -> Result<(), String> {
    for (name, decl) in inputs {
        if decl.shapes.is_empty() && decl.values.is_empty() {
            return Err(format!("inputs.{name} declares neither shapes nor values"));
        }
        if let Some(shape) = decl.shapes.iter().find(|s| s.iter().any(|&d| d < -1)) {
            return Err(format!(
                "inputs.{name}: shape {shape:?} has a dimension below -1 (-1 means any size)"
            ));
        }
        for (i, v) in decl.values.iter().enumerate() {
            if let AllowedValue::Float(f) = v {
                if !f.is_finite() {
                    return Err(format!("inputs.{name}: values must be finite numbers"));
                }
            }
            if decl.values[..i].contains(v) {
                return Err(format!("inputs.{name}: value {v} is listed twice"));
            }
        }
        let Some(other) = &decl.paired_with else {
            continue;
        };
        let paired = inputs
            .get(other)
            .filter(|_| other != name)
            .ok_or_else(|| {
                format!("inputs.{name}.paired_with names '{other}', which must be another input declared with values")
            })?;
        if decl.shapes.is_empty() || paired.values.len() != decl.shapes.len() {
            return Err(format!(
                "inputs.{name} is paired_with '{other}': it needs one shape per value of '{other}' \
                 ({} shapes, {} values)",
                decl.shapes.len(),
                paired.values.len()
            ));
        }
    }
    Ok(())
}

/// Hashes the model file and compares it with the manifest, so that a corrupted or swapped
/// file is refused before it is ever loaded.
pub fn verify_sha256(entry: &ModelEntry) -> Result<(), String> {
    let actual = sha256_file(&entry.file)
        .map_err(|e| format!("cannot read model file {}: {e}", entry.file.display()))?;
    if actual != entry.sha256 {
        return Err(format!(
            "sha256 mismatch for {}: manifest says {}, file has {}",
            entry.file.display(),
            entry.sha256,
            actual
        ));
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Orders versions numerically where both are numbers, else as strings; the highest is the
/// default version of a model.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

    #[test]
    fn defaults_apply_and_entries_override() {
        let text = format!(
            r#"
            [defaults]
            replicas = 2
            max_queue_delay_ms = 3

            [[models]]
            name = "a"
            version = "1"
            file = "a/1/model.onnx"
            sha256 = "{HASH}"
            max_batch_size = 8
            device = "cuda:1"
            fallback = "b"
            batch_axes = {{ state = 1, sr = "shared" }}

            [[models]]
            name = "b"
            version = "1"
            file = "b.onnx"
            sha256 = "{HASH}"
            replicas = 1
            "#
        );
        let m = Manifest::parse(Path::new("/m"), &text).unwrap();
        let a = &m.models[0];
        assert_eq!(a.replicas, 2);
        assert_eq!(a.device, Device::Cuda(1));
        assert_eq!(a.batching.max_batch_size, 8);
        assert_eq!(a.batching.max_queue_delay, Duration::from_millis(3));
        assert_eq!(a.file, PathBuf::from("/m/a/1/model.onnx"));
        assert_eq!(a.batch_axes["state"], BatchAxis::Axis(1));
        assert_eq!(a.batch_axes["sr"], BatchAxis::Shared);
        assert_eq!(m.models[1].replicas, 1);
        assert_eq!(m.models[1].batching.max_batch_size, 0);
    }

    #[test]
    fn bad_manifests_are_refused_with_reasons() {
        let unknown_fallback = format!(
            "[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\nfallback='zz'\n"
        );
        let err = Manifest::parse(Path::new("."), &unknown_fallback).unwrap_err();
        assert!(err.to_string().contains("fallback 'zz'"), "{err}");
        let bad_device =
            format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\ndevice='tpu'\n");
        let err = Manifest::parse(Path::new("."), &bad_device).unwrap_err();
        assert!(err.to_string().contains("cuda:N"), "{err}");
        let bad_hash = "[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='abc'\n";
        assert!(Manifest::parse(Path::new("."), bad_hash).is_err());
        let misspelt =
            format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\nreplica=2\n");
        let err = Manifest::parse(Path::new("."), &misspelt).unwrap_err();
        assert!(err.to_string().contains("unknown field `replica`"), "{err}");
    }

    #[test]
    fn input_declarations_and_non_finite_flag() {
        let text = format!(
            r#"
            [defaults]
            allow_non_finite = true

            [[models]]
            name = "vad"
            version = "1"
            file = "v.onnx"
            sha256 = "{HASH}"
            inputs.input = {{ shapes = [[-1, 576], [-1, 288]], paired_with = "sr" }}
            inputs.sr = {{ values = [16000, 8000] }}

            [[models]]
            name = "b"
            version = "1"
            file = "b.onnx"
            sha256 = "{HASH}"
            allow_non_finite = false
            "#
        );
        let m = Manifest::parse(Path::new("/m"), &text).unwrap();
        let vad = &m.models[0];
        assert!(vad.allow_non_finite, "from [defaults]");
        assert!(!m.models[1].allow_non_finite, "the entry overrides");
        assert_eq!(
            vad.inputs["input"].shapes,
            vec![vec![-1, 576], vec![-1, 288]]
        );
        assert_eq!(vad.inputs["input"].paired_with.as_deref(), Some("sr"));
        assert_eq!(
            vad.inputs["sr"].values,
            vec![AllowedValue::Int(16000), AllowedValue::Int(8000)]
        );
        assert!(m.models[1].inputs.is_empty());
        let plain = format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\n");
        assert!(!Manifest::parse(Path::new("."), &plain).unwrap().models[0].allow_non_finite);
    }

    #[test]
    fn bad_input_declarations_are_refused() {
        let refused = |decl: &str| {
            let text =
                format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\n{decl}\n");
            Manifest::parse(Path::new("."), &text)
                .unwrap_err()
                .to_string()
        };
        assert!(refused("inputs.x = { shape = [[1]] }").contains("unknown field `shape`"));
        assert!(refused("inputs.x = {}").contains("neither shapes nor values"));
        assert!(refused("inputs.x = { shapes = [[-2, 3]] }").contains("below -1"));
        assert!(refused("inputs.x = { values = [1, 1] }").contains("listed twice"));
        assert!(
            refused("inputs.x = { shapes = [[1], [2]], paired_with = 'y' }")
                .contains("must be another input declared with values")
        );
        assert!(
            refused("inputs.x = { shapes = [[1]], paired_with = 'x', values = [1] }")
                .contains("must be another input")
        );
        let mismatch = refused(
            "inputs.x = { shapes = [[1], [2]], paired_with = 'y' }\ninputs.y = { values = [1] }",
        );
        assert!(
            mismatch.contains("one shape per value of 'y' (2 shapes, 1 values)"),
            "{mismatch}"
        );
        assert!(refused("allow_non_finite = 'yes'").contains("allow_non_finite"));
    }

    #[test]
    fn versions_order_numerically() {
        assert_eq!(compare_versions("10", "9"), std::cmp::Ordering::Greater);
        assert_eq!(compare_versions("b", "a"), std::cmp::Ordering::Greater);
    }
}
