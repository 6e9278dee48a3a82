//! `streamserve profile`: runs a model version over a reference data set and stores what its
//! outputs looked like (`profile.json`, the yardstick of drift) beside the model file, tied to
//! the model's sha256; with `--probe`, also a golden-input probe (`probe.json`) made from the
//! data set's first request whose answer is all finite, and that answer. Publish both with the
//! version.
//!
//! Each request is validated as the server validates it ([`ModelInfo::validate`]): a request
//! the server would refuse (an empty batch, a wrong shape or type) is an error naming its line,
//! rather than rows the server never sees, or a probe it always refuses.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use crate::manifest::{sha256_file, verify_sha256, Manifest, ModelEntry};
use crate::monitor::probe::{Probe, TensorJson};
use crate::monitor::profile::{Profile, ProfileBuilder};

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
    /// Also write `probe.json`: the first request of the data set whose answer is all finite,
    /// and that answer.
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
    // The version's interface exactly as the server checks it when it loads the version (batch
    // axes, input rules, a stream's layout), so that requests are validated as it would.
    let info = crate::actors::supervisor::model_info(
        entry,
        session.inputs().to_vec(),
        session.outputs().to_vec(),
        entry.device,
    )
    .map_err(anyhow::Error::msg)?;
    let output_names: Vec<String> = info.outputs.iter().map(|o| o.name.clone()).collect();

    let file = std::fs::File::open(&args.data)
        .with_context(|| format!("cannot read the data set {}", args.data.display()))?;
    let mut builder = ProfileBuilder::new(&output_names);
    // The probe (its JSON) and the line it came from.
    let mut golden: Option<(usize, String)> = None;
    let mut first_unfit: Option<(usize, String)> = None;
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line)
            .with_context(|| format!("line {number} is not a KServe v2 request"))?;
        let decoded = parsed
            .inputs
            .iter()
            .map(TensorJson::decode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("line {number}: {e}"))?;
        let request = info
            .validate(decoded, None)
            .map_err(|e| anyhow::anyhow!("line {number}: the server would refuse it: {e}"))?;
        let inputs = request.inputs;
        let borrowed: Vec<(&[i64], &crate::tensor::TensorData)> = inputs
            .iter()
            .map(|t| (t.shape.as_slice(), &t.data))
            .collect();
        let outputs = session
            .run(&borrowed)
            .map_err(|e| anyhow::anyhow!("line {number}: the model refused it: {}", e.message))?;
        builder.add_outputs(&outputs, request.rows);
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
        if args.probe && golden.is_none() {
            // A probe must be written as JSON numbers and expect what a healthy version
            // answers: a request whose answer holds NaN or infinity is passed over.
            match Probe::write_json(&inputs, &outputs) {
                Ok(text) => golden = Some((number, text)),
                Err(why) => {
                    first_unfit.get_or_insert((number, why.to_string()));
                }
            }
        }
    }
    anyhow::ensure!(
        builder.rows() > 0,
        "the data set {} has no requests",
        args.data.display()
    );
    let without = builder.without_finite_values();
    anyhow::ensure!(
        without.is_empty(),
        "the model answered no finite value in output(s) {} over the data set {}: no reference can be cut from it",
        without.join(", "),
        args.data.display()
    );

    // Nothing is written unless everything asked for can be.
    let probe = match (args.probe, golden) {
        (false, _) => None,
        (true, Some(golden)) => Some(golden),
        (true, None) => {
            let (line, why) = first_unfit.unwrap_or_default();
            anyhow::bail!(
                "no probe written (nor a profile): no request of the data set has an answer a \
                 probe can hold (line {line}: {why})"
            );
        }
    };
    let profile = builder.finish(
        &entry.sha256,
        Some(
            sha256_file(&args.data)
                .with_context(|| format!("cannot read {}", args.data.display()))?,
        ),
    );
    profile.check_outputs().map_err(anyhow::Error::msg)?;
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
    if let Some((number, text)) = probe {
        let path = Probe::path_beside(&entry.file);
        write_atomically(&path, &text)?;
        match first_unfit {
            Some((line, why)) => println!(
                "probe from line {number} (line {line} could not be one: {why}) -> {}",
                path.display()
            ),
            None => println!("probe from line {number} -> {}", path.display()),
        }
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
