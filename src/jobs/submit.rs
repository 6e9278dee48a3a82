//! Checking a job at submission, so that what can be known at once fails the request with a
//! clear error instead of the job later: the model exists, the input is there and readable (a
//! local JSON Lines file's rows counted; an object's existence asked of its store), and the
//! output can be written (a local one: its directory exists, the output does not, no other
//! job writes it, and its `.part` file can be made, which is then the job's; an object: absent,
//! and an object written beside it and removed).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    now_ms, remote, Checkpoint, JobRecord, JobSpec, JobState, Jobs, OnError, OutputClaim, Source,
    MAX_LINE_BYTES,
};
use crate::error::ServeError;

/// The body of `POST /v2/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    pub model: String,
    #[serde(default)]
    pub version: Option<String>,
    /// A JSON Lines file or a `.npy` array: a path on the server (absolute, or relative to its
    /// working directory) or an object-store URI (`s3://bucket/path`).
    pub input: String,
    /// Where the answers go (a path or a URI); must not exist yet.
    pub output: String,
    /// The field of each line that is the row's key [default: `key`].
    #[serde(default)]
    pub key_field: Option<String>,
    #[serde(default)]
    pub on_error: Option<OnError>,
    /// Rows sent per second at most; unset or 0: as fast as the low-priority lane goes.
    #[serde(default)]
    pub max_rows_per_sec: Option<u32>,
    /// When it succeeds, serve its output by key (`GET /v2/models/{model}/predictions/{key}`).
    #[serde(default)]
    pub publish: bool,
    /// For a `.npy` input: the model input its rows go to [default: the model's only input].
    #[serde(default)]
    pub input_name: Option<String>,
}

fn absolute(what: &str, path: &str) -> Result<PathBuf, ServeError> {
    let path = path.strip_prefix("file://").unwrap_or(path);
    if path.trim().is_empty() {
        return Err(ServeError::invalid(format!("{what} is empty")));
    }
    std::path::absolute(path)
        .map_err(|e| ServeError::invalid(format!("{what} '{path}' is not a usable path: {e}")))
}

/// Rows in a JSON Lines file: its lines that are not blank. A line longer than
/// [`MAX_LINE_BYTES`] is an error naming it: a row is read whole into memory, so the bound is
/// checked here, at submission, without holding any line.
pub(super) fn count_rows(path: &Path) -> std::io::Result<Result<u64, String>> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let (mut rows, mut line, mut length, mut blank) = (0u64, 1u64, 0usize, true);
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(Ok(rows + u64::from(!blank)));
        }
        let consumed = buffer.len();
        for &byte in buffer {
            if byte == b'\n' {
                rows += u64::from(!blank);
                (line, length, blank) = (line + 1, 0, true);
                continue;
            }
            length += 1;
            blank &= byte.is_ascii_whitespace();
            if length > MAX_LINE_BYTES {
                return Ok(Err(format!(
                    "line {line} of the input is longer than {MAX_LINE_BYTES} bytes"
                )));
            }
        }
        reader.consume(consumed);
    }
}

/// The job's record, queued, with its `.part` file made, and its output claimed until the
/// job is in the registry; or why it cannot run.
pub(super) fn check(
    jobs: &Jobs,
    submission: Submission,
) -> Result<(JobRecord, OutputClaim), ServeError> {
    let Submission {
        model,
        version,
        input,
        output,
        key_field,
        on_error,
        max_rows_per_sec,
        publish,
        input_name,
    } = submission;
    // The model, as a request would find it (a cold version is fine: the job loads it).
    let served = match jobs
        .inner
        .catalog
        .snapshot()
        .resolve(&model, version.as_deref())
    {
        Ok(served) => Some(served),
        Err(e @ (ServeError::ModelNotFound(_) | ServeError::VersionNotFound { .. })) => {
            return Err(e)
        }
        Err(_) => None, // cold, or known but not serving now: the job waits for it
    };
    let id = format!("job-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    // The server's own directory (--jobs-dir): a failure here is its operator's to fix, so
    // a 5xx, and the log says where.
    std::fs::create_dir_all(&jobs.inner.dir).map_err(|e| {
        tracing::error!(dir = %jobs.inner.dir.display(), error = %e, "cannot make the jobs directory (set --jobs-dir / STREAMSERVE_JOBS_DIR to a writable one)");
        ServeError::Storage(format!(
            "the server cannot make its jobs directory {}: {e}",
            jobs.inner.dir.display()
        ))
    })?;

    // The input: a local JSON Lines file is read where it is and counted now; an object or a
    // `.npy` array is staged by the job into the jobs directory first (and counted then).
    let npy = input.trim_end().to_ascii_lowercase().ends_with(".npy");
    let npy_input = if npy {
        // Its rows are written keyed `key` (their index): another field would find no key in
        // any row, and a job asked to publish them would fail at its end.
        if key_field
            .as_deref()
            .is_some_and(|k| !k.is_empty() && k != "key")
        {
            return Err(ServeError::invalid(
                "key_field is for JSON Lines inputs: a .npy array's rows are keyed by their index",
            ));
        }
        Some(npy_input_name(input_name, served.as_ref())?)
    } else if input_name.is_some() {
        return Err(ServeError::invalid(
            "input_name is for .npy inputs; a JSON Lines row names its inputs",
        ));
    } else {
        None
    };
    let (input_path, source, rows_total) = match remote::parse(&input) {
        Some(remote) => {
            let remote = remote.map_err(ServeError::invalid)?;
            jobs.block_on(async move { remote.check_input().await })
                .map_err(ServeError::invalid)?;
            let from = input.trim().to_string();
            (
                super::record::staged_input(&jobs.inner.dir, &id),
                Some(Source { from, npy_input }),
                0,
            )
        }
        None => {
            let path = absolute("input", &input)?;
            readable_file(&path)?;
            match npy_input {
                Some(npy_input) => {
                    let from = path.display().to_string();
                    (
                        super::record::staged_input(&jobs.inner.dir, &id),
                        Some(Source {
                            from,
                            npy_input: Some(npy_input),
                        }),
                        0,
                    )
                }
                None => {
                    let rows = count_rows(&path)
                        .map_err(|e| {
                            ServeError::invalid(format!(
                                "input file '{}' cannot be read: {e}",
                                path.display()
                            ))
                        })?
                        .map_err(ServeError::invalid)?;
                    (path, None, rows)
                }
            }
        }
    };

    // The output: a local file beside which `.part` is made now (proving the place
    // writable); an object checked absent and writable, its rows written in the jobs
    // directory and uploaded when complete.
    let (output_path, upload_to, claim) = match remote::parse(&output) {
        Some(remote) => {
            let remote = remote.map_err(ServeError::invalid)?;
            let uri = remote.uri().to_string();
            if source.as_ref().is_some_and(|s| s.from == uri) {
                return Err(ServeError::invalid("output is the input"));
            }
            // Claimed before the store is asked: another submission of this output while
            // it answers is refused, not a second job uploading over the first's answers.
            let claim = jobs.claim_output(uri.clone()).ok_or_else(|| {
                ServeError::invalid(format!(
                    "output '{uri}' is not writable: another job is writing it"
                ))
            })?;
            jobs.block_on(async move { remote.check_output().await })
                .map_err(ServeError::invalid)?;
            (
                super::record::staged_output(&jobs.inner.dir, &id),
                Some(uri),
                claim,
            )
        }
        None => {
            let path = absolute("output", &output)?;
            let claim = local_output(jobs, &path, &input_path)?;
            (path, None, claim)
        }
    };
    let spec = JobSpec {
        model,
        version,
        input: input_path,
        output: output_path,
        key_field: key_field
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "key".into()),
        on_error: on_error.unwrap_or_default(),
        max_rows_per_sec: max_rows_per_sec.filter(|n| *n > 0),
        publish,
        source,
        upload_to,
    };
    // Making the `.part` file proves the location writable; it is the job's from now on.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(spec.part_path())
        .map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::AlreadyExists => format!(
                    "'{}' exists (a job writing there?)",
                    spec.part_path().display()
                ),
                _ => e.to_string(),
            };
            ServeError::invalid(format!(
                "output location '{}' is not writable: {why}",
                spec.output.display()
            ))
        })?;
    let record = JobRecord {
        id,
        staged: spec.source.is_none(),
        spec,
        state: JobState::Queued,
        rows_total,
        progress: Checkpoint::default(),
        message: None,
        created_unix_ms: now_ms(),
        finished_unix_ms: None,
    };
    Ok((record, claim))
}

/// The model input a `.npy` array's rows go to: the one named, or the model's only input.
fn npy_input_name(
    named: Option<String>,
    served: Option<&crate::actors::catalog::ServedModel>,
) -> Result<String, ServeError> {
    if let Some(name) = named.filter(|n| !n.is_empty()) {
        if let Some(served) = served {
            if !served.info.inputs.iter().any(|i| i.name == name) {
                return Err(ServeError::invalid(format!(
                    "input_name '{name}' is not an input of model '{}'",
                    served.info.name
                )));
            }
        }
        return Ok(name);
    }
    match served.map(|s| s.info.inputs.as_slice()) {
        Some([only]) => Ok(only.name.clone()),
        Some(inputs) => Err(ServeError::invalid(format!(
            "a .npy input feeds one model input: name it with input_name (one of: {})",
            inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        None => Err(ServeError::invalid(
            "the model is not loaded, so its input is not known: name it with input_name",
        )),
    }
}

fn readable_file(path: &Path) -> Result<(), ServeError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(ServeError::invalid(format!(
            "input '{}' is not a file",
            path.display()
        ))),
        Err(e) => Err(ServeError::invalid(format!(
            "input file '{}' cannot be read: {e}",
            path.display()
        ))),
    }
}

/// A local output: not the input, in a directory that exists, not there yet, and no other
/// job's (claimed for this submission).
fn local_output(jobs: &Jobs, output: &Path, input: &Path) -> Result<OutputClaim, ServeError> {
    if output == input {
        return Err(ServeError::invalid("output is the input file"));
    }
    let unwritable = |why: String| {
        ServeError::invalid(format!(
            "output location '{}' is not writable: {why}",
            output.display()
        ))
    };
    let parent = output
        .parent()
        .ok_or_else(|| unwritable("it has no directory".into()))?;
    if !parent.is_dir() {
        return Err(unwritable(format!(
            "directory '{}' does not exist",
            parent.display()
        )));
    }
    if output.exists() {
        return Err(unwritable("it already exists".into()));
    }
    jobs.claim_output(output.display().to_string())
        .ok_or_else(|| unwritable("another job is writing it".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_the_lines_that_are_not_blank() {
        let path = std::env::temp_dir().join(format!("jobs-count-{}.jsonl", std::process::id()));
        std::fs::write(&path, "{}\n\n  \n{}\n{}").unwrap();
        assert_eq!(count_rows(&path).unwrap(), Ok(3));
        std::fs::write(&path, "").unwrap();
        assert_eq!(count_rows(&path).unwrap(), Ok(0));
        let long = format!("{{}}\n{}\n", "x".repeat(MAX_LINE_BYTES + 1));
        std::fs::write(&path, long).unwrap();
        let error = count_rows(&path).unwrap().unwrap_err();
        assert!(
            error.starts_with("line 2 of the input is longer than"),
            "{error}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_submission_names_its_fields_and_takes_no_others() {
        let ok: Submission = serde_json::from_str(
            r#"{"model": "m", "input": "a", "output": "b", "on_error": "skip"}"#,
        )
        .unwrap();
        assert_eq!(ok.on_error, Some(OnError::Skip));
        assert!(serde_json::from_str::<Submission>(r#"{"model": "m", "input": "a"}"#).is_err());
        assert!(serde_json::from_str::<Submission>(
            r#"{"model": "m", "input": "a", "output": "b", "on_error": "ignore"}"#
        )
        .is_err());
    }

    #[test]
    fn the_part_file_sits_beside_the_output() {
        let spec = JobSpec {
            model: "m".into(),
            version: None,
            input: "/in.jsonl".into(),
            output: "/data/out.jsonl".into(),
            key_field: "key".into(),
            on_error: OnError::Stop,
            max_rows_per_sec: None,
            publish: false,
            source: None,
            upload_to: None,
        };
        assert_eq!(spec.part_path(), PathBuf::from("/data/out.jsonl.part"));
    }
}
