//! An instance's local copies of what it took from the registry: model files (verified
//! against their record's sha256 before they are used), their records, and the last desired
//! state it read of each model, so that it can serve after a restart while the registry is
//! unreachable.
//!
//! A download goes to a temporary file beside its final name and is renamed only once its
//! size and sha256 match the record: a partial or corrupt download is never served, and the
//! reason is reported; one larger than its record says is not downloaded beyond that size.
//! The temporary file is locked while it is written, so that the leftover of a process that
//! died mid-download is told apart from a live download and removed. One directory per
//! registry (named by a hash of its URI), so that two registries never mix.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::records::{Desired, VersionRecord};
use super::{RegistryError, Store};
use crate::manifest::sha256_file;

#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// The cache of registry `uri` under `dir`. A relative `dir` (the default,
    /// `.streamserve-cache`) is taken from the current directory once, here: a model entry
    /// made from a cached file resolves its file against the file's own directory, so a
    /// relative path would name the cache twice over (`dir/…/dir/…/<sha256>.onnx`) and no
    /// version could load.
    pub fn open(dir: &Path, uri: &str) -> Result<Cache, RegistryError> {
        let tag = hex::encode(&Sha256::digest(uri.as_bytes())[..8]);
        let dir = std::path::absolute(dir).map_err(|e| {
            RegistryError::Local(format!("cannot resolve cache {}: {e}", dir.display()))
        })?;
        let root = dir.join(tag);
        std::fs::create_dir_all(root.join("desired")).map_err(|e| {
            RegistryError::Local(format!("cannot create cache {}: {e}", root.display()))
        })?;
        Ok(Cache { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn version_dir(&self, name: &str, version: &str) -> PathBuf {
        self.root.join("models").join(name).join(version)
    }

    /// Where `record`'s model file lives once it is here.
    pub fn model_file(&self, record: &VersionRecord) -> PathBuf {
        self.version_dir(&record.name, &record.version)
            .join(format!("{}.onnx", record.sha256))
    }

    /// The model file of `record`, downloaded and verified if it is not here yet (a copy
    /// here that does not match is replaced). Blocking file hashing runs off the caller's
    /// thread.
    pub async fn fetch(
        &self,
        store: &Store,
        record: &VersionRecord,
    ) -> Result<PathBuf, RegistryError> {
        let path = self.model_file(record);
        self.write_companions(record)?;
        if self.verified(record).await {
            return Ok(path);
        }
        let dir = self.version_dir(&record.name, &record.version);
        std::fs::create_dir_all(&dir)
            .map_err(|e| RegistryError::Local(format!("cannot create {}: {e}", dir.display())))?;
        remove_stale_parts(&dir, &record.sha256);
        let part = dir.join(format!(
            ".{}.part-{:016x}",
            record.sha256,
            fastrand::u64(..)
        ));
        // Held until the download is renamed or removed: it tells a live download from the
        // leftover of a process that died in the middle of one.
        let _held = PartLock::create(&part)?;
        let key = super::file_key(&record.name, &record.version, &record.sha256);
        let outcome = store.download_at_most(&key, &part, Some(record.size)).await;
        let checked = outcome.and_then(|(size, sha256)| {
            if size != record.size {
                Err(RegistryError::Corrupt(format!(
                    "{}:{}: the model file is {size} bytes, its record says {} (a partial or \
                     replaced upload); not served",
                    record.name, record.version, record.size
                )))
            } else if sha256 != record.sha256 {
                Err(RegistryError::Corrupt(format!(
                    "{}:{}: the model file's sha256 is {sha256}, its record says {}; not served",
                    record.name, record.version, record.sha256
                )))
            } else {
                Ok(())
            }
        });
        if let Err(e) = checked {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        std::fs::rename(&part, &path).map_err(|e| {
            let _ = std::fs::remove_file(&part);
            RegistryError::Local(format!(
                "cannot move the download to {}: {e}",
                path.display()
            ))
        })?;
        Ok(path)
    }

    /// The model file of `record` if it is here already and verified (nothing is
    /// downloaded): what an instance serves while the registry does not answer.
    pub async fn local(&self, record: &VersionRecord) -> Result<Option<PathBuf>, RegistryError> {
        self.write_companions(record)?;
        Ok(self.verified(record).await.then(|| self.model_file(record)))
    }

    /// Writes the version's `profile.json` and `probe.json` from its record beside its model
    /// file (where loading reads them), and removes stale ones the record does not have.
    fn write_companions(&self, record: &VersionRecord) -> Result<(), RegistryError> {
        let dir = self.version_dir(&record.name, &record.version);
        std::fs::create_dir_all(&dir)
            .map_err(|e| RegistryError::Local(format!("cannot create {}: {e}", dir.display())))?;
        let model_file = self.model_file(record);
        let files = [
            (
                crate::monitor::profile::Profile::path_beside(&model_file),
                &record.profile,
            ),
            (
                crate::monitor::probe::Probe::path_beside(&model_file),
                &record.probe,
            ),
        ];
        for (path, content) in files {
            match content {
                Some(value) => write_json(&path, value)?,
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }

    /// Whether `record`'s file is here with the right sha256.
    async fn verified(&self, record: &VersionRecord) -> bool {
        let path = self.model_file(record);
        if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(record.size) {
            return false;
        }
        let sha256 = record.sha256.clone();
        tokio::task::spawn_blocking(move || sha256_file(&path).is_ok_and(|h| h == sha256))
            .await
            .unwrap_or(false)
    }

    /// Keeps a version's record beside its file (to serve it without the registry).
    pub fn save_record(&self, record: &VersionRecord) -> Result<(), RegistryError> {
        let dir = self.version_dir(&record.name, &record.version);
        write_json(&dir.join("version.json"), record)
    }

    pub fn load_record(&self, name: &str, version: &str) -> Option<VersionRecord> {
        read_json(&self.version_dir(name, version).join("version.json"))
    }

    /// Keeps the last desired state read of a model.
    pub fn save_desired(&self, desired: &Desired) -> Result<(), RegistryError> {
        write_json(
            &self
                .root
                .join("desired")
                .join(format!("{}.json", desired.model)),
            desired,
        )
    }

    /// Every desired state kept here.
    pub fn load_desired(&self) -> Vec<Desired> {
        let Ok(entries) = std::fs::read_dir(self.root.join("desired")) else {
            return Vec::new();
        };
        let mut all: Vec<Desired> = entries
            .flatten()
            .filter_map(|e| read_json::<Desired>(&e.path()))
            .filter(|d| super::check_name("model name", &d.model).is_ok())
            .collect();
        all.sort_by(|a, b| a.model.cmp(&b.model));
        all
    }
}

/// Removes the `.<sha256>.part-*` files in `dir` that no live download holds (a process
/// killed while downloading leaves its part behind; each restart would add another).
fn remove_stale_parts(dir: &Path, sha256: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{sha256}.part-");
    for entry in entries.flatten() {
        let stale = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(&prefix));
        if !stale {
            continue;
        }
        let path = entry.path();
        if let Ok(Some(_lock)) = PartLock::try_take(&path) {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(part = %path.display(), "removed an interrupted download"),
                Err(e) => {
                    tracing::warn!(part = %path.display(), error = %e, "cannot remove an interrupted download")
                }
            }
        }
    }
}

/// An exclusive advisory lock (flock) on a download's part file, released when dropped or
/// when its process dies.
struct PartLock {
    _file: std::fs::File,
}

impl PartLock {
    fn create(path: &Path) -> Result<PartLock, RegistryError> {
        let file = std::fs::File::create(path)
            .map_err(|e| RegistryError::Local(format!("cannot write {}: {e}", path.display())))?;
        match PartLock::lock(file) {
            Ok(Some(lock)) => Ok(lock),
            Ok(None) => Err(RegistryError::Local(format!(
                "{} is being written by another download",
                path.display()
            ))),
            Err(e) => Err(RegistryError::Local(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    /// The lock of an existing part, or `None` while a live download holds it.
    fn try_take(path: &Path) -> std::io::Result<Option<PartLock>> {
        PartLock::lock(std::fs::OpenOptions::new().write(true).open(path)?)
    }

    fn lock(file: std::fs::File) -> std::io::Result<Option<PartLock>> {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked == 0 {
            return Ok(Some(PartLock { _file: file }));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), RegistryError> {
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir)
        .map_err(|e| RegistryError::Local(format!("cannot create {}: {e}", dir.display())))?;
    let text = serde_json::to_vec_pretty(value).expect("registry documents serialize");
    crate::files::write_atomically(path, &text)
        .map_err(|e| RegistryError::Local(format!("cannot write {}: {e}", path.display())))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}
