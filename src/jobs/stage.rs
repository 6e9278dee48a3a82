//! What a job does before its first row and after its last when its input or output is not a
//! local JSON Lines file (docs/jobs.md, "Inputs and outputs"): staging downloads an object
//! and converts a `.npy` array into JSON Lines at `spec.input` in the jobs directory (to a
//! temporary name, renamed when complete, so a restart stages again or finds it whole), and
//! counts its rows; delivering uploads the finished output to its object, whole.

use std::path::PathBuf;
use std::time::Duration;

use super::record::with_suffix;
use super::{npy, remote, submit, JobSpec};

/// Uploads are tried this many times, backing off, before the job fails.
const UPLOAD_TRIES: u32 = 5;

/// Makes `spec.input` from `spec.source`: the rows it holds.
pub(super) async fn stage(spec: &JobSpec) -> Result<u64, String> {
    let Some(source) = spec.source.clone() else {
        return Err("the job has no input to stage".into());
    };
    let tmp = with_suffix(&spec.input, ".tmp");
    let downloaded = match remote::parse(&source.from) {
        Some(remote) => {
            let remote = remote?;
            let dest = if source.npy_input.is_some() {
                with_suffix(&spec.input, ".npy")
            } else {
                tmp.clone()
            };
            remote.download(&dest).await?;
            Some(dest)
        }
        None => None,
    };
    let local = downloaded
        .clone()
        .unwrap_or_else(|| PathBuf::from(&source.from));
    let converted = tmp.clone();
    let rows = tokio::task::spawn_blocking(move || match &source.npy_input {
        // Named as submitted, not as the copy staged.
        Some(input_name) => npy::npy_to_jsonl(&local, input_name, &converted)
            .map_err(|e| format!("{}: {}", source.from, e.kind)),
        None => submit::count_rows(&converted)
            .map_err(|e| format!("cannot read {}: {e}", source.from))?,
    })
    .await
    .map_err(|e| format!("staging the input failed: {e}"))?;
    if let Some(npy) = downloaded.filter(|d| *d != tmp) {
        let _ = std::fs::remove_file(npy);
    }
    let rows = rows.inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::rename(&tmp, &spec.input)
        .and_then(|()| crate::files::sync_dir(&spec.input))
        .map_err(|e| format!("cannot stage the input at {}: {e}", spec.input.display()))?;
    Ok(rows)
}

/// Moves the finished `.part` file to `spec.output` (in the jobs directory) and uploads it
/// to `uri`. Done again after a restart between the two, it only uploads.
pub(super) async fn deliver(spec: &JobSpec, uri: &str) -> Result<(), String> {
    let part = spec.part_path();
    if part.exists() {
        std::fs::rename(&part, &spec.output)
            .and_then(|()| crate::files::sync_dir(&spec.output))
            .map_err(|e| format!("cannot rename {}: {e}", part.display()))?;
    }
    let remote = remote::parse(uri).ok_or_else(|| format!("'{uri}' is not an object URI"))??;
    let mut attempt = 0;
    loop {
        match remote.upload(&spec.output).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt + 1 >= UPLOAD_TRIES => {
                return Err(format!("cannot upload the output: {e}"))
            }
            Err(e) => tracing::warn!(output = %uri, error = %e, "upload failed; trying again"),
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
    }
}
