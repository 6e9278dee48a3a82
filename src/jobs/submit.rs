//! Checking a job at submission, so that what can be known at once fails the request with a
//! clear error instead of the job later: the model exists, the input file is there and
//! readable (its rows counted), and the output can be written (its directory exists, the
//! output does not, no other job writes it, and its `.part` file can be made, which is then
//! the job's).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{now_ms, Checkpoint, JobRecord, JobSpec, JobState, Jobs, OnError, MAX_LINE_BYTES};
use crate::error::ServeError;

/// The body of `POST /v2/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    pub model: String,
    #[serde(default)]
    pub version: Option<String>,
    /// A JSON Lines file on the server: absolute, or relative to its working directory.
    pub input: String,
    /// Where the answers go (same rules); must not exist yet.
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
}

fn absolute(what: &str, path: &str) -> Result<PathBuf, ServeError> {
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

/// The job's record, queued, with its `.part` file made; or why it cannot run.
pub(super) fn check(jobs: &Jobs, submission: Submission) -> Result<JobRecord, ServeError> {
    let Submission {
        model,
        version,
        input,
        output,
        key_field,
        on_error,
        max_rows_per_sec,
        publish,
    } = submission;
    // The model, as a request would find it (a cold version is fine: the job loads it).
    match jobs
        .inner
        .catalog
        .snapshot()
        .resolve(&model, version.as_deref())
    {
        Ok(_) | Err(ServeError::ModelCold { .. }) => {}
        Err(e @ (ServeError::ModelNotFound(_) | ServeError::VersionNotFound { .. })) => {
            return Err(e)
        }
        Err(_) => {} // known but not serving now: the job waits for it
    }
    let input_path = absolute("input", &input)?;
    match std::fs::metadata(&input_path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(ServeError::invalid(format!(
                "input '{}' is not a file",
                input_path.display()
            )))
        }
        Err(e) => {
            return Err(ServeError::invalid(format!(
                "input file '{}' cannot be read: {e}",
                input_path.display()
            )))
        }
    }
    let rows_total = count_rows(&input_path)
        .map_err(|e| {
            ServeError::invalid(format!(
                "input file '{}' cannot be read: {e}",
                input_path.display()
            ))
        })?
        .map_err(ServeError::invalid)?;
    let output_path = absolute("output", &output)?;
    if output_path == input_path {
        return Err(ServeError::invalid("output is the input file"));
    }
    let unwritable = |why: String| {
        ServeError::invalid(format!(
            "output location '{}' is not writable: {why}",
            output_path.display()
        ))
    };
    let parent = output_path
        .parent()
        .ok_or_else(|| unwritable("it has no directory".into()))?;
    if !parent.is_dir() {
        return Err(unwritable(format!(
            "directory '{}' does not exist",
            parent.display()
        )));
    }
    if output_path.exists() {
        return Err(unwritable("it already exists".into()));
    }
    if jobs.outputs_in_use().contains(&output_path) {
        return Err(unwritable("another job is writing it".into()));
    }
    let spec = JobSpec {
        model,
        version,
        input: input_path,
        output: output_path.clone(),
        key_field: key_field
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "key".into()),
        on_error: on_error.unwrap_or_default(),
        max_rows_per_sec: max_rows_per_sec.filter(|n| *n > 0),
        publish,
    };
    // Making the `.part` file proves the location writable; it is the job's from now on.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(spec.part_path())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => unwritable(format!(
                "'{}' exists (a job writing there?)",
                spec.part_path().display()
            )),
            _ => unwritable(e.to_string()),
        })?;
    Ok(JobRecord {
        id: format!("job-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        spec,
        state: JobState::Queued,
        rows_total,
        progress: Checkpoint::default(),
        message: None,
        created_unix_ms: now_ms(),
        finished_unix_ms: None,
    })
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
        };
        assert_eq!(spec.part_path(), PathBuf::from("/data/out.jsonl.part"));
    }
}
