//! What a job is, as its state file keeps it (`store.rs`) and the API shows it: what was
//! asked for ([`JobSpec`]), where it stands ([`JobState`], [`Checkpoint`]), and the rules of
//! its files (where its `.part` file sits, what it may remove when it ends).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a job does with a row it cannot run (malformed JSON, a tensor that does not decode or
/// does not fit the model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The job fails at the first bad row, naming its line; its output is removed.
    #[default]
    Stop,
    /// The row's output line carries `"error"`; the job goes on and counts it.
    Skip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// Where a job stages its input in the jobs directory (an object, or a `.npy` array converted
/// to JSON Lines): `<jobs_dir>/<id>.input.jsonl`.
pub(super) fn staged_input(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.input.jsonl"))
}

/// Where a job whose output is an object writes it before the upload:
/// `<jobs_dir>/<id>.output.jsonl`, kept after the upload only while it serves the job's
/// published predictions.
pub(super) fn staged_output(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.output.jsonl"))
}

/// The job a file of the jobs directory was staged for, if it is one: its staged input (and
/// what staging it leaves on the way, `.tmp`, `.npy`) or the local copy of its output (and
/// its `.part`), as [`staged_input`] and [`staged_output`] name them.
pub(super) fn staged_for(name: &str) -> Option<&str> {
    const STAGED: [&str; 5] = [
        "input.jsonl",
        "input.jsonl.tmp",
        "input.jsonl.npy",
        "output.jsonl",
        "output.jsonl.part",
    ];
    let (id, rest) = name.split_once('.')?;
    (id.starts_with("job-") && STAGED.contains(&rest)).then_some(id)
}

/// `path` with `suffix` added to its file name (`out.jsonl` → `out.jsonl.part`).
pub(super) fn with_suffix(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What was asked for, checked at submission (absolute paths).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSpec {
    pub model: String,
    pub version: Option<String>,
    pub input: PathBuf,
    pub output: PathBuf,
    pub key_field: String,
    pub on_error: OnError,
    pub max_rows_per_sec: Option<u32>,
    /// When it succeeds, its output becomes the model's published predictions.
    #[serde(default)]
    pub publish: bool,
    /// Where the rows come from when `input` is a copy the job makes before its first row.
    #[serde(default)]
    pub source: Option<Source>,
    /// The object the output is uploaded to when complete (`output` is then in the jobs
    /// directory).
    #[serde(default)]
    pub upload_to: Option<String>,
}

/// An input the job stages into the jobs directory as JSON Lines before its first row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Source {
    /// The object-store URI or the local path that was submitted.
    pub from: String,
    /// A `.npy` array: the model input its rows go to.
    pub npy_input: Option<String>,
}

impl JobSpec {
    /// Where the answers end up, as the user named it: the object's URI or the path.
    pub fn output_name(&self) -> String {
        self.upload_to
            .clone()
            .unwrap_or_else(|| self.output.display().to_string())
    }

    /// Removes what the job kept in the jobs directory and no longer needs once it ended:
    /// the `.part` file, a staged input, and a local copy of an uploaded output (kept when it
    /// succeeded and serves its published predictions).
    pub(super) fn discard_files(&self, succeeded: bool) {
        let _ = std::fs::remove_file(self.part_path());
        if self.source.is_some() {
            // The staged input, and what a staging cut short left: the rows being written
            // and a downloaded array (stage.rs).
            for suffix in ["", ".tmp", ".npy"] {
                let _ = std::fs::remove_file(with_suffix(&self.input, suffix));
            }
        }
        if self.upload_to.is_some() && !(succeeded && self.publish) {
            let _ = std::fs::remove_file(&self.output);
        }
    }

    /// The input as the user named it.
    pub fn input_name(&self) -> String {
        self.source
            .as_ref()
            .map_or_else(|| self.input.display().to_string(), |s| s.from.clone())
    }

    /// Where the output is written until it is complete.
    pub fn part_path(&self) -> PathBuf {
        with_suffix(&self.output, ".part")
    }
}

/// A row that could not be run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RowError {
    pub line: u64,
    pub error: String,
}

/// How many bad rows a job keeps the line numbers of (it counts them all).
pub const KEPT_ERRORS: usize = 20;

/// Longest input line (one row, read whole into memory): the default request body bound.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// How far a job has durably got: everything here is in the `.part` file, fsynced.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Rows answered (or written as errors).
    pub rows_done: u64,
    /// The input's line number of the last row written (1-based; 0 before the first).
    pub line: u64,
    /// Bytes of the input consumed by those rows.
    pub input_bytes: u64,
    /// Bytes of the `.part` file that are complete.
    pub part_bytes: u64,
    pub errors: u64,
    /// The first [`KEPT_ERRORS`] bad rows.
    pub first_errors: Vec<RowError>,
}

/// One job as its state file keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub spec: JobSpec,
    /// The input is ready to read at `spec.input` (always, for a local JSON Lines input).
    #[serde(default = "staged_by_default")]
    pub staged: bool,
    pub state: JobState,
    /// Rows in the input (its non-blank lines), counted at submission.
    pub rows_total: u64,
    pub progress: Checkpoint,
    /// Why it failed.
    pub message: Option<String>,
    pub created_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
}

fn staged_by_default() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_are_known_by_their_names() {
        let dir = Path::new("/jobs");
        let input = staged_input(dir, "job-0123456789ab");
        let output = staged_output(dir, "job-0123456789ab");
        for path in [
            input.clone(),
            with_suffix(&input, ".tmp"),
            with_suffix(&input, ".npy"),
            output.clone(),
            with_suffix(&output, ".part"),
        ] {
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(staged_for(name), Some("job-0123456789ab"), "{name}");
        }
        for name in [
            "job-0123456789ab.json",
            ".job-0123456789ab.json.tmp",
            "published.json",
            "answers.output.jsonl",
            "job-0123456789ab.output.jsonl.bak",
        ] {
            assert_eq!(staged_for(name), None, "{name}");
        }
    }
}
