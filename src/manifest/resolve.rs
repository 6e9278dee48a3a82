//! From the file to [`Manifest`]: reads `models.toml`, applies `[defaults]` to each model,
//! checks names, versions, hashes, duplicates, input declarations and fallbacks, and fills the
//! replica bounds. Errors name the file, the model and the offending key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::raw::{RawDefaults, RawManifest};
use super::types::{AllowedValue, Device, InputDecl, LoadPolicy};
use super::{Batching, Manifest, ModelEntry, MANIFEST_FILE};

/// Longest model version: the longest the admin API takes (a version it could not name could
/// be served but never unloaded, deployed or rolled back).
pub const MAX_VERSION_CHARS: usize = 64;
const _: () = assert!(MAX_VERSION_CHARS == crate::api::admin::MAX_VERSION_LEN);

/// Letters, digits, `_`, `-`, `.`, at least one: what a model name or version may hold.
fn is_label(label: &str) -> bool {
    !label.is_empty()
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
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
        let manifest = Manifest::resolve(dir, raw)?;
        // A whole manifest names its streams' stages and gates among its own models. Not a
        // registry entry, one version alone: its stages are other registry versions (or
        // bundled ones), found when it loads (`supervisor::loading`).
        check_stream_stages(&manifest.models)?;
        for m in &manifest.models {
            if let Some(fallback) = &m.fallback {
                anyhow::ensure!(
                    manifest.models.iter().any(|e| &e.name == fallback),
                    "model {}:{} names fallback '{}', which the manifest does not list",
                    m.name,
                    m.version,
                    fallback
                );
            }
        }
        Ok(manifest)
    }

    /// One version published in the model registry: `settings` are the keys of a
    /// `[[models]]` entry other than its identity (name, version, file, sha256), checked as
    /// the manifest checks them; `file` is where the model file is. The fallback it names is
    /// not checked here, nor its stream's stages and gate: each may be another registry model,
    /// or a bundled one.
    pub fn registry_entry(
        name: &str,
        version: &str,
        file: &Path,
        sha256: &str,
        settings: &toml::Table,
    ) -> anyhow::Result<ModelEntry> {
        if let Some(key) = IDENTITY_KEYS.iter().find(|k| settings.contains_key(**k)) {
            anyhow::bail!("the serving settings may not set '{key}' (it comes from the registry)");
        }
        let mut model = settings.clone();
        model.insert("name".into(), name.into());
        model.insert("version".into(), version.into());
        model.insert("file".into(), file.display().to_string().into());
        model.insert("sha256".into(), sha256.into());
        let mut table = toml::Table::new();
        table.insert(
            "models".into(),
            toml::Value::Array(vec![toml::Value::Table(model)]),
        );
        let raw: RawManifest = toml::Value::Table(table).try_into()?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let mut manifest = Manifest::resolve(dir, raw)?;
        Ok(manifest.models.remove(0))
    }

    /// Each model's serving settings as the registry records them: its `[[models]]` keys
    /// with `[defaults]` filled in, less its identity (name, version, file, sha256); in the
    /// order of [`Manifest::parse`]'s models.
    pub fn settings_tables(text: &str) -> anyhow::Result<Vec<toml::Table>> {
        let table: toml::Table = toml::from_str(text)?;
        let defaults = table
            .get("defaults")
            .and_then(|d| d.as_table())
            .cloned()
            .unwrap_or_default();
        let models = match table.get("models") {
            Some(toml::Value::Array(models)) => models.clone(),
            _ => Vec::new(),
        };
        Ok(models
            .into_iter()
            .filter_map(|m| match m {
                toml::Value::Table(t) => Some(t),
                _ => None,
            })
            .map(|mut model| {
                for (key, value) in &defaults {
                    model.entry(key.clone()).or_insert_with(|| value.clone());
                }
                for key in IDENTITY_KEYS {
                    model.remove(*key);
                }
                model
            })
            .collect())
    }

    fn resolve(dir: &Path, raw: RawManifest) -> anyhow::Result<Manifest> {
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
                is_label(&m.name),
                "model name '{}' must be non-empty and use only letters, digits, '_', '-', '.'",
                m.name
            );
            // A version is addressed as a name is (a URL path segment, an admin request, a
            // metric label), so it follows the same rule, and the admin API's length limit.
            anyhow::ensure!(
                is_label(&m.version) && m.version.chars().count() <= MAX_VERSION_CHARS,
                "model {}: version '{}' must be 1-{MAX_VERSION_CHARS} letters, digits, '_', '-' or '.'",
                m.name,
                crate::untrusted::Untrusted(&m.version)
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
                delay_ms.is_finite() && (0.0..=MAX_QUEUE_DELAY_MS).contains(&delay_ms),
                "model {}:{}: max_queue_delay_ms must be in 0..={MAX_QUEUE_DELAY_MS}",
                m.name,
                m.version
            );
            let replicas = s.replicas.or(d.replicas).unwrap_or(1).max(1);
            let min_replicas = s.min_replicas.or(d.min_replicas).unwrap_or(0);
            let max_replicas = s.max_replicas.or(d.max_replicas).unwrap_or(0);
            let intra_threads = s.intra_threads.or(d.intra_threads).unwrap_or(1).max(1);
            check_threads(replicas, min_replicas, max_replicas, intra_threads)
                .map_err(|e| anyhow::anyhow!("model {}:{}: {e}", m.name, m.version))?;
            check_input_decls(&m.inputs)
                .map_err(|e| anyhow::anyhow!("model {}:{}: {e}", m.name, m.version))?;
            if let Some(stream) = &m.stream {
                stream
                    .validate(&m.name)
                    .map_err(|e| anyhow::anyhow!("model {}:{}: stream: {e}", m.name, m.version))?;
            }
            models.push(ModelEntry {
                file: dir.join(&m.file),
                sha256: m.sha256.to_ascii_lowercase(),
                device: s.device.or(d.device).unwrap_or(Device::Cpu),
                allow_cpu_fallback: s
                    .allow_cpu_fallback
                    .or(d.allow_cpu_fallback)
                    .unwrap_or(false),
                replicas,
                min_replicas,
                max_replicas,
                intra_threads,
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
                stream: m.stream.map(std::sync::Arc::new),
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
        Ok(Manifest {
            dir: dir.to_path_buf(),
            models,
        })
    }
}

/// The longest batching delay a model may ask for. Past a minute it is no longer a batching
/// delay, and `Duration` cannot hold every number a manifest can spell.
const MAX_QUEUE_DELAY_MS: f64 = 60_000.0;
/// The most replicas (or autoscaling bound) of one version.
const MAX_REPLICAS: usize = 1024;
/// The most ONNX Runtime threads one version may start at its largest: replicas (or
/// max_replicas) times intra_threads. Each replica is a thread of its own with a session of
/// its own; far past the machine's cores they only contend, and past the OS's thread limit a
/// manifest would abort the process while it starts instead of being refused.
const MAX_THREADS: usize = 4096;

/// The replica counts and threads of one version are within bounds a machine can start.
fn check_threads(
    replicas: usize,
    min_replicas: usize,
    max_replicas: usize,
    intra_threads: usize,
) -> anyhow::Result<()> {
    for (key, n) in [
        ("replicas", replicas),
        ("min_replicas", min_replicas),
        ("max_replicas", max_replicas),
        ("intra_threads", intra_threads),
    ] {
        anyhow::ensure!(
            n <= MAX_REPLICAS,
            "{key} must be at most {MAX_REPLICAS}, not {n}"
        );
    }
    let threads = replicas.max(max_replicas) * intra_threads;
    anyhow::ensure!(
        threads <= MAX_THREADS,
        "replicas (or max_replicas) x intra_threads is {threads} threads; at most \
         {MAX_THREADS} are allowed"
    );
    Ok(())
}

/// Every stage of a declared stream names a model of this manifest, and a gate names one
/// that serves voice activity streams on its own, at every rate the stream declares. (Whether
/// the models have the tensors the declaration names is checked when the declaring version
/// loads: `stream::layout::check_declaration`.)
fn check_stream_stages(models: &[ModelEntry]) -> anyhow::Result<()> {
    for m in models {
        let Some(stream) = &m.stream else { continue };
        for stage in &stream.stages {
            anyhow::ensure!(
                models.iter().any(|other| other.name == stage.model),
                "model {}:{}: stream stage '{}' is not a model of this manifest",
                m.name,
                m.version,
                stage.model
            );
        }
        let Some(gate) = &stream.gate else { continue };
        let vad_alone = |other: &ModelEntry| {
            other.stream.as_ref().is_some_and(|s| {
                s.kind == super::StreamKind::Vad && s.stages.is_empty() && s.gate.is_none()
            })
        };
        let named: Vec<&ModelEntry> = models.iter().filter(|o| o.name == gate.model).collect();
        anyhow::ensure!(
            !named.is_empty(),
            "model {}:{}: stream gate '{}' is not a model of this manifest",
            m.name,
            m.version,
            gate.model
        );
        anyhow::ensure!(
            named.iter().all(|o| vad_alone(o)),
            "model {}:{}: stream gate '{}' must serve voice activity streams on its own (stream = \"vad\", or kind = \"vad\" with no stages)",
            m.name,
            m.version,
            gate.model
        );
        // The gate hears every stream the declaration takes: a rate it does not take would
        // refuse each gated stream at that rate at its `start`, not the manifest here.
        for other in named {
            let rates = other
                .stream
                .as_ref()
                .map_or(&[][..], |s| &s.sample_rates[..]);
            if let Some(rate) = stream.sample_rates.iter().find(|r| !rates.contains(r)) {
                anyhow::bail!(
                    "model {}:{}: stream gate '{}' (version {}) does not take {rate} Hz, which the \
                     stream's sample_rates list; gate only rates it takes, or list only those",
                    m.name,
                    m.version,
                    gate.model,
                    other.version
                );
            }
        }
    }
    Ok(())
}

/// The keys of a `[[models]]` entry that say which version it is, not how it is served.
const IDENTITY_KEYS: &[&str] = &["name", "version", "file", "sha256"];

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
