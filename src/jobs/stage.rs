//! What a job does before its first row and after its last when its input or output is not a
//! local JSON Lines file (docs/jobs.md, "Inputs and outputs"): staging downloads an object
//! and converts a `.npy` array into JSON Lines at `spec.input` in the jobs directory (to a
//! temporary name, renamed when complete, so a restart stages again or finds it whole), and
//! counts its rows; delivering uploads the finished output to its object, whole.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use super::record::with_suffix;
use super::{npy, remote, submit, JobSpec, Signal};

/// Uploads are tried this many times, backing off, before the job fails.
const UPLOAD_TRIES: u32 = 5;

/// Resolves once the job is told to stop (a shutdown or a cancel).
async fn stop_signalled(mut signal: watch::Receiver<Signal>) {
    if signal.wait_for(|s| *s != Signal::Run).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Makes `spec.input` from `spec.source`: the rows it holds, or `None` when the job was
/// stopped meanwhile. A stopped staging removes what it had written (the download, the
/// half-converted rows) before it returns: a job cancelled while staging leaves nothing in
/// the jobs directory, and one stopped by a shutdown stages again at the next start.
pub(super) async fn stage(
    spec: &JobSpec,
    signal: watch::Receiver<Signal>,
) -> Result<Option<u64>, String> {
    let Some(source) = spec.source.clone() else {
        return Err("the job has no input to stage".into());
    };
    let tmp = with_suffix(&spec.input, ".tmp");
    let remove = |paths: &[&Path]| {
        for path in paths {
            let _ = std::fs::remove_file(path);
        }
    };
    let downloaded = match remote::parse(&source.from) {
        Some(remote) => {
            let remote = remote?;
            let dest = if source.npy_input.is_some() {
                with_suffix(&spec.input, ".npy")
            } else {
                tmp.clone()
            };
            tokio::select! {
                got = remote.download(&dest) => got.inspect_err(|_| remove(&[&dest]))?,
                () = stop_signalled(signal.clone()) => {
                    remove(&[&dest]);
                    return Ok(None);
                }
            };
            Some(dest)
        }
        None => None,
    };
    let local = downloaded
        .clone()
        .unwrap_or_else(|| PathBuf::from(&source.from));
    let converted = tmp.clone();
    let watching = signal.clone();
    let stopped = move || *watching.borrow() != Signal::Run;
    // Waited for whole, even when the job is stopped (the conversion checks between rows),
    // so that nothing writes the temporary file after it is removed.
    let rows = tokio::task::spawn_blocking(move || match &source.npy_input {
        // Named as submitted, not as the copy staged.
        Some(input_name) => npy::npy_to_jsonl(&local, input_name, &converted, &stopped)
            .map_err(|e| format!("{}: {}", source.from, e.kind)),
        None => submit::count_rows(&converted)
            .map_err(|e| format!("cannot read {}: {e}", source.from))?,
    })
    .await
    .map_err(|e| format!("staging the input failed: {e}"))?;
    if let Some(npy) = downloaded.filter(|d| *d != tmp) {
        remove(&[&npy]);
    }
    if *signal.borrow() != Signal::Run {
        remove(&[&tmp]);
        return Ok(None);
    }
    let rows = rows.inspect_err(|_| remove(&[&tmp]))?;
    std::fs::rename(&tmp, &spec.input)
        .and_then(|()| crate::files::sync_dir(&spec.input))
        .map_err(|e| format!("cannot stage the input at {}: {e}", spec.input.display()))?;
    Ok(Some(rows))
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
