//! From the file to [`Manifest`]: reads `models.toml`, applies `[defaults]` to each model,
//! checks names, hashes, duplicates, input declarations and fallbacks, and fills the replica
//! bounds. Errors name the file, the model and the offending key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::raw::{RawDefaults, RawManifest};
use super::types::{AllowedValue, Device, InputDecl, LoadPolicy};
use super::{Batching, Manifest, ModelEntry, MANIFEST_FILE};

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
