//! A job's input or output in an object store (`s3://bucket/dir/rows.jsonl`, `gs://`,
//! `az://`), through the registry's storage layer ([`crate::registry::Store`]: the same
//! clients, credentials from the same `AWS_*` / `GOOGLE_*` / `AZURE_*` environment, never
//! logged). A job does not read or write an object row by row: its input is downloaded into
//! the jobs directory before the first row (staging, `run.rs`), and its output is written
//! there as a local one is, then uploaded whole when every row is in it; an object store's
//! put is atomic, so a reader never sees a half-written output under its name.

use std::path::Path;

use crate::registry::store::WriteIf;
use crate::registry::{RegistryError, Store};

/// An object named by a URI: the store of its directory and its name there.
pub(super) struct Remote {
    store: Store,
    key: String,
    uri: String,
}

/// The object `uri` names, or `None` when it is a local path (`file://` URIs included).
pub(super) fn parse(uri: &str) -> Option<Result<Remote, String>> {
    let uri = uri.trim();
    if !uri.contains("://") || uri.starts_with("file://") {
        return None;
    }
    let (dir, key) = match uri.rsplit_once('/') {
        Some((dir, key)) if !key.is_empty() && !dir.ends_with(':') && dir.contains("://") => {
            (dir, key)
        }
        _ => {
            return Some(Err(format!(
                "'{uri}' names no object (use scheme://bucket/path/name)"
            )))
        }
    };
    if dir.ends_with('/') || dir.split_once("://").is_some_and(|(_, b)| b.is_empty()) {
        return Some(Err(format!("'{uri}' names no bucket")));
    }
    Some(
        Store::open(dir)
            .map(|store| Remote {
                store,
                key: key.to_string(),
                uri: uri.to_string(),
            })
            .map_err(|e| described(uri, e)),
    )
}

/// A storage error as a job or a submission says it.
fn described(uri: &str, e: RegistryError) -> String {
    match e {
        RegistryError::Unreachable(why) => format!(
            "'{uri}': the object store failed: {why} (its endpoint and credentials come from the server's environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; GOOGLE_*; AZURE_*)"
        ),
        RegistryError::NotFound(_) => format!("'{uri}' does not exist"),
        other => format!("'{uri}': {other}"),
    }
}

/// The suffix of the object (`{}`) a submission writes (and removes) to prove it may write
/// beside the output.
const WRITE_CHECK: &str = ".streamserve-write-check";

impl Remote {
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The input exists.
    pub async fn check_input(&self) -> Result<(), String> {
        match self.store.exists(&self.key).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("input '{}' does not exist", self.uri)),
            Err(e) => Err(described(&self.uri, e)),
        }
    }

    /// The output does not exist yet, and an object can be written beside it.
    pub async fn check_output(&self) -> Result<(), String> {
        match self.store.exists(&self.key).await {
            Ok(false) => {}
            Ok(true) => return Err(format!("output '{}' already exists", self.uri)),
            Err(e) => return Err(described(&self.uri, e)),
        }
        let probe = format!("{}{WRITE_CHECK}", self.key);
        self.store
            .write_json(&probe, &serde_json::json!({}), WriteIf::Always)
            .await
            .map_err(|e| format!("output '{}' is not writable: {}", self.uri, e))?;
        let _ = self.store.delete(&probe).await;
        Ok(())
    }

    /// Downloads the object to `dest`: its size.
    pub async fn download(&self, dest: &Path) -> Result<u64, String> {
        self.store
            .download(&self.key, dest)
            .await
            .map(|(size, _)| size)
            .map_err(|e| described(&self.uri, e))
    }

    /// Uploads `file` as the object (whole: it appears when complete).
    pub async fn upload(&self, file: &Path) -> Result<u64, String> {
        self.store
            .upload(&self.key, file)
            .await
            .map_err(|e| described(&self.uri, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_are_not_remote_and_a_uri_must_name_an_object() {
        assert!(parse("/data/rows.jsonl").is_none());
        assert!(parse("rows.jsonl").is_none());
        assert!(parse("file:///data/rows.jsonl").is_none());
        for bad in ["s3://bucket", "s3://bucket/", "s3:///rows.jsonl"] {
            assert!(parse(bad).unwrap().is_err(), "{bad}");
        }
        let remote = parse("s3://bucket/dir/rows.jsonl").unwrap().unwrap();
        assert_eq!(remote.key, "rows.jsonl");
        assert_eq!(remote.uri(), "s3://bucket/dir/rows.jsonl");
        assert!(parse("ftp://host/rows.jsonl").unwrap().is_err());
    }
}
