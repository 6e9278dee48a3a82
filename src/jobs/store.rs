//! A job's state file, `<jobs_dir>/<id>.json`, written atomically (`crate::files`): a crash
//! at any moment leaves either the previous state or the new one, never a torn file.

use std::path::{Path, PathBuf};

use super::lookup::PUBLISHED_FILE;
use super::JobRecord;

fn path_of(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Writes `record` atomically and durably.
pub(super) fn save(dir: &Path, record: &JobRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    crate::files::write_atomically(&path_of(dir, &record.id), &bytes)
}

/// Removes job `id`'s state file (already gone is no error).
pub(super) fn remove(dir: &Path, id: &str) -> std::io::Result<()> {
    match std::fs::remove_file(path_of(dir, id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every job in `dir` (none when it does not exist). A file that does not read, or that is
/// not `<id>.json` of the job it holds, is skipped with a warning: one damaged job must not
/// keep the server from starting, and no job is loaded twice.
pub(super) fn load_all(dir: &Path) -> std::io::Result<Vec<JobRecord>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !is_job_file(name) {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<JobRecord>(&b).map_err(|e| e.to_string()))
        {
            // A copy of a state file under another name (a backup beside it) holds the same
            // job: loaded too, the job would run twice, both writing its one `.part` file.
            Ok(record) if path_of(dir, &record.id) != path => {
                tracing::warn!(file = %path.display(), job = %record.id, "skipping a job state file not named after its job (a copy?)")
            }
            Ok(record) => records.push(record),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping a job state file that does not read")
            }
        }
    }
    Ok(records)
}

/// A job's state file: `<id>.json`, not hidden (a write in progress), and not
/// `published.json`, the lookup tables' index (`lookup.rs`), which is no job.
fn is_job_file(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(".json") && name != PUBLISHED_FILE
}

#[cfg(test)]
mod tests {
    use super::super::{Checkpoint, JobSpec, JobState, OnError};
    use super::*;

    #[test]
    fn a_saved_record_loads_back() {
        let dir = std::env::temp_dir().join(format!("jobs-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let record = JobRecord {
            id: "j1".into(),
            spec: JobSpec {
                model: "m".into(),
                version: None,
                input: "/in".into(),
                output: "/out".into(),
                key_field: "key".into(),
                on_error: OnError::Skip,
                max_rows_per_sec: Some(5),
                publish: false,
                source: None,
                upload_to: None,
            },
            staged: true,
            state: JobState::Running,
            rows_total: 10,
            progress: Checkpoint {
                rows_done: 4,
                part_bytes: 100,
                ..Checkpoint::default()
            },
            message: None,
            created_unix_ms: 1,
            finished_unix_ms: None,
        };
        save(&dir, &record).unwrap();
        save(&dir, &record).unwrap();
        remove(&dir, "j2").expect("a file already gone is no error");
        std::fs::write(dir.join("junk.json"), "{").unwrap();
        // A copy of a job's file is not a second job of the same id.
        std::fs::copy(dir.join("j1.json"), dir.join("j1.backup.json")).unwrap();
        let loaded = load_all(&dir).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].progress.part_bytes, 100);
        assert_eq!(loaded[0].spec.on_error, OnError::Skip);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_job_state_files_are_read_as_jobs() {
        assert!(is_job_file("job-0123456789ab.json"));
        assert!(!is_job_file(PUBLISHED_FILE), "the tables' index is no job");
        assert!(!is_job_file(".job-0123456789ab.json.tmp"));
        assert!(!is_job_file("job-0123456789ab.part"));
    }
}
