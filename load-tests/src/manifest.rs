//! Model directories for in-process benchmark servers, built from entries of the bundled
//! `models/models.toml` (so that hashes and serving settings stay those of the checkout), with
//! absolute model paths and per-benchmark changes.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// `models/models.toml` of the checkout this crate was built from.
pub fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models")
        .join("models.toml")
}

/// A change to one copied entry: set these keys, remove those.
#[derive(Clone, Debug, Default)]
pub struct EntryChange {
    pub set: Vec<(&'static str, toml::Value)>,
    pub remove: Vec<&'static str>,
}

/// The `models.toml` text of a directory that serves only the named models: their entries
/// from `bundled` (and its `[defaults]`), each `file` made absolute and its change applied.
/// Also returns each model's absolute file, in the order asked.
pub fn from_bundled(
    bundled: &Path,
    note: &str,
    models: &[(&str, EntryChange)],
) -> anyhow::Result<(String, Vec<PathBuf>)> {
    let text = std::fs::read_to_string(bundled)
        .with_context(|| format!("cannot read {}", bundled.display()))?;
    let parsed: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} does not parse", bundled.display()))?;
    let dir = bundled
        .parent()
        .context("the manifest has no directory")?
        .canonicalize()?;
    let entries = parsed
        .get("models")
        .and_then(|m| m.as_array())
        .with_context(|| format!("{} lists no models", bundled.display()))?;
    let mut tables = Vec::new();
    let mut files = Vec::new();
    for (name, change) in models {
        let mut entry = entries
            .iter()
            .find(|m| m.get("name").and_then(|n| n.as_str()) == Some(*name))
            .and_then(|m| m.as_table())
            .cloned()
            .with_context(|| format!("{} has no {name} entry", bundled.display()))?;
        let file = entry
            .get("file")
            .and_then(|f| f.as_str())
            .with_context(|| format!("the {name} entry has no file"))?;
        let file = dir
            .join(file)
            .canonicalize()
            .with_context(|| format!("{file} (from {}) not found", bundled.display()))?;
        entry.insert("file".into(), file.display().to_string().into());
        for key in &change.remove {
            entry.remove(*key);
        }
        for (key, value) in &change.set {
            entry.insert((*key).into(), value.clone());
        }
        tables.push(toml::Value::Table(entry));
        files.push(file);
    }
    let mut out = toml::Table::new();
    if let Some(defaults) = parsed.get("defaults") {
        out.insert("defaults".into(), defaults.clone());
    }
    out.insert("models".into(), toml::Value::Array(tables));
    let manifest = format!(
        "# Written by streamserve-load for one benchmark run, from {}: {note}.\n{}",
        bundled.display(),
        toml::to_string(&out)?
    );
    Ok((manifest, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_copied_and_changed() {
        let change = EntryChange {
            set: vec![("replicas", toml::Value::Integer(3))],
            remove: vec!["fallback"],
        };
        let (text, files) = from_bundled(
            &bundled(),
            "test",
            &[("mlp", change), ("mlp_small", EntryChange::default())],
        )
        .unwrap();
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|f| f.is_absolute() && f.is_file()));
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        let models = parsed["models"].as_array().unwrap();
        assert_eq!(models[0]["name"].as_str(), Some("mlp"));
        assert_eq!(models[0]["replicas"].as_integer(), Some(3));
        assert!(models[0].get("fallback").is_none());
        assert!(models[0].get("sha256").is_some());
        assert_eq!(models[1]["name"].as_str(), Some("mlp_small"));
        assert!(from_bundled(&bundled(), "x", &[("nope", EntryChange::default())]).is_err());
    }
}
