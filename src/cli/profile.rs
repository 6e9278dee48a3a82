//! `streamserve profile`: runs a model version over a reference data set and stores what its
//! outputs looked like (`profile.json`, the yardstick of drift) beside the model file, tied to
//! the model's sha256; with `--probe`, also a golden-input probe (`probe.json`) made from the
//! data set's first request and the answer the model gave it. Publish both with the version.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use crate::manifest::{sha256_file, verify_sha256, Manifest, ModelEntry};
use crate::monitor::probe::{Probe, TensorJson};
use crate::monitor::profile::{Profile, ProfileBuilder};
use crate::tensor::NamedTensor;

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The model version: `name:version`, or `name` when the manifest has one version of it.
    pub model: String,
    /// The reference data set: JSON Lines, each line a KServe v2 request body
    /// (`{"inputs": [{"name", "shape", "datatype", "data"}, ...]}`).
    #[arg(long)]
    pub data: PathBuf,
    /// Model directory holding `models.toml`.
    #[arg(long, env = "STREAMSERVE_MODELS", default_value = "models")]
    pub models: PathBuf,
    /// Also write `probe.json`: the first request of the data set and the model's answer to it.
    #[arg(long)]
    pub probe: bool,
    /// Path of libonnxruntime; otherwise `ORT_DYLIB_PATH`, then the project's `.venv`.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib: Option<PathBuf>,
}

/// One line of the data set; other keys of a KServe request (`id`, `outputs`, `parameters`)
/// are allowed and ignored.
#[derive(Deserialize)]
struct Line {
    inputs: Vec<TensorJson>,
}

pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(&args.models)?;
    let entry = find(&manifest, &args.model)?;
    verify_sha256(entry).map_err(anyhow::Error::msg)?;
    let sessions =
        crate::runtime::ort_sessions(args.ort_dylib.as_deref()).map_err(anyhow::Error::msg)?;
    let mut session = sessions.load(entry).map_err(anyhow::Error::msg)?;
    let input_specs = session.inputs().to_vec();
    let output_names: Vec<String> = session.outputs().iter().map(|o| o.name.clone()).collect();

    let file = std::fs::File::open(&args.data)
        .with_context(|| format!("cannot read the data set {}", args.data.display()))?;
    let mut builder = ProfileBuilder::new(&output_names);
    let mut first: Option<(Vec<NamedTensor>, Vec<NamedTensor>)> = None;
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line)
            .with_context(|| format!("line {number} is not a KServe v2 request"))?;
        let mut inputs = Vec::with_capacity(input_specs.len());
        for spec in &input_specs {
            let tensor = parsed
                .inputs
                .iter()
                .find(|t| t.name == spec.name)
                .with_context(|| format!("line {number} lacks input '{}'", spec.name))?;
            inputs.push(
                tensor
                    .decode()
                    .map_err(|e| anyhow::anyhow!("line {number}: {e}"))?,
            );
        }
        let borrowed: Vec<(&[i64], &crate::tensor::TensorData)> = inputs
            .iter()
            .map(|t| (t.shape.as_slice(), &t.data))
            .collect();
        let outputs = session
            .run(&borrowed)
            .map_err(|e| anyhow::anyhow!("line {number}: the model refused it: {}", e.message))?;
        let rows = inputs[0].shape.first().map_or(1, |&d| d.max(1) as usize);
        builder.add_outputs(&outputs, rows);
        for input in &inputs {
            let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
            crate::monitor::visit_values(&input.data, |v| {
                if v.is_finite() {
                    min = min.min(v);
                    max = max.max(v);
                }
            });
            builder.add_input_range(&input.name, min, max);
        }
        if first.is_none() {
            first = Some((inputs, outputs));
        }
    }
    anyhow::ensure!(
        builder.rows() > 0,
        "the data set {} has no requests",
        args.data.display()
    );

    let profile = builder.finish(
        &entry.sha256,
        Some(
            sha256_file(&args.data)
                .with_context(|| format!("cannot read {}", args.data.display()))?,
        ),
    );
    let path = Profile::path_beside(&entry.file);
    write_atomically(&path, &serde_json::to_string_pretty(&profile)?)?;
    println!(
        "profile of {}:{} from {} rows -> {}",
        entry.name,
        entry.version,
        profile.rows,
        path.display()
    );
    for (name, output) in &profile.outputs {
        println!("  output {name}: {} buckets", output.edges.buckets());
    }
    if args.probe {
        let (inputs, answer) = first.expect("at least one row");
        let path = Probe::path_beside(&entry.file);
        write_atomically(&path, &Probe::write_json(&inputs, &answer))?;
        println!("probe -> {}", path.display());
    }
    Ok(())
}

/// The manifest entry `spec` (`name:version`, or `name` with one version) names.
fn find<'m>(manifest: &'m Manifest, spec: &str) -> anyhow::Result<&'m ModelEntry> {
    let (name, version) = match spec.split_once(':') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let matching: Vec<&ModelEntry> = manifest
        .models
        .iter()
        .filter(|e| e.name == name && version.is_none_or(|v| e.version == v))
        .collect();
    match matching.as_slice() {
        [one] => Ok(one),
        [] => anyhow::bail!(
            "the manifest in {} has no model {spec}",
            manifest.dir.display()
        ),
        _ => anyhow::bail!("model {name} has several versions: name one as {name}:VERSION"),
    }
}

/// Writes through a temporary file and a rename, so that a server reading the file never
/// sees half of it.
fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    crate::files::write_atomically(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
