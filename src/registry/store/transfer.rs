//! Model files between a local disk and the store, streamed both ways with bounded memory.
//!
//! An upload is hashed as it is read, in the same pass that sends it, so that what the store
//! keeps is exactly what was hashed: a file changed after its caller hashed it is never
//! completed under the old hash ([`Store::upload_exact`]). A multipart upload that fails
//! for any reason (a part refused, the network, a local read, a changed file) is aborted
//! before the error is returned: an S3 bucket keeps (and bills) the parts of an upload that
//! is neither completed nor aborted, and nothing else would ever clean them up.

use std::path::Path as FsPath;

use futures_util::StreamExt;
use object_store::{ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::{short, RegistryError, Store, UPLOAD_PART};

/// Parts in flight at once: with [`UPLOAD_PART`], the most an upload holds in memory.
const PARTS_IN_FLIGHT: usize = 4;

/// What an upload must turn out to be (a size and sha256 its caller read before).
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub size: u64,
    pub sha256: &'a str,
}

impl Store {
    /// Uploads a local file (in parts, never whole in memory), overwriting. Returns its size.
    pub async fn upload(&self, key: &str, file: &FsPath) -> Result<u64, RegistryError> {
        self.upload_checked(key, file, None).await
    }

    /// [`Store::upload`] of a file that must still be `expected`: the bytes are hashed as
    /// they are sent, and the upload is completed only if they are what the caller hashed
    /// (else it is aborted, and the answer is [`RegistryError::Refused`]).
    pub async fn upload_exact(
        &self,
        key: &str,
        file: &FsPath,
        expected: Expected<'_>,
    ) -> Result<(), RegistryError> {
        self.upload_checked(key, file, Some(expected))
            .await
            .map(drop)
    }

    async fn upload_checked(
        &self,
        key: &str,
        file: &FsPath,
        expected: Option<Expected<'_>>,
    ) -> Result<u64, RegistryError> {
        let mut input = tokio::fs::File::open(file)
            .await
            .map_err(|e| RegistryError::Local(format!("cannot read {}: {e}", file.display())))?;
        let upload = self
            .bulk
            .put_multipart(&self.path(key))
            .await
            .map_err(|e| self.failed("upload", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART);
        match self
            .send(key, file, &mut input, &mut writer, expected)
            .await
        {
            // `finish` aborts the upload itself when completing it fails.
            Ok(sent) => match writer.finish().await {
                Ok(_) => Ok(sent),
                Err(e) => Err(self.failed("upload", key, e)),
            },
            Err(e) => match self.abort(key, writer).await {
                None => Err(e),
                Some(left) => Err(e.with_note(&left)),
            },
        }
    }

    /// Streams `input` into `writer`; returns its size. With `expected`, hashes it as it goes
    /// and checks it at the end (an upload with nothing to check against is not hashed).
    async fn send(
        &self,
        key: &str,
        file: &FsPath,
        input: &mut tokio::fs::File,
        writer: &mut WriteMultipart,
        expected: Option<Expected<'_>>,
    ) -> Result<u64, RegistryError> {
        let mut buffer = vec![0u8; 1024 * 1024];
        let mut hasher = expected.map(|_| Sha256::new());
        let mut total = 0u64;
        loop {
            let n = input.read(&mut buffer).await.map_err(|e| {
                RegistryError::Local(format!("cannot read {}: {e}", file.display()))
            })?;
            if n == 0 {
                break;
            }
            writer
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(|e| self.failed("upload", key, e))?;
            if let Some(hasher) = &mut hasher {
                hasher.update(&buffer[..n]);
            }
            writer.write(&buffer[..n]);
            total += n as u64;
        }
        // The parts sent so far, done: a failure among them is this function's to abort.
        writer
            .wait_for_capacity(0)
            .await
            .map_err(|e| self.failed("upload", key, e))?;
        if let Some((expected, hasher)) = expected.zip(hasher) {
            let sha256 = hex::encode(hasher.finalize());
            if expected.size != total || expected.sha256 != sha256 {
                return Err(RegistryError::Refused(format!(
                    "{} changed while it was being pushed (hashed: {} bytes, sha256 {}; sent: \
                     {total} bytes, sha256 {sha256}); nothing was published: push it again once \
                     it is written",
                    file.display(),
                    expected.size,
                    expected.sha256
                )));
            }
        }
        Ok(total)
    }

    /// Aborts a failed upload, so that the store drops its parts. Best effort: the error
    /// that failed the upload is the one its caller needs; when the abort fails too, that is
    /// logged (as every store error, without credentials) and returned as a note for that
    /// error, since the command line logs nothing.
    async fn abort(&self, key: &str, writer: WriteMultipart) -> Option<String> {
        match writer.abort().await {
            Ok(()) => {
                tracing::info!(registry = %self.uri, key, "failed upload aborted");
                None
            }
            Err(e) => {
                let error = short(&e);
                tracing::warn!(
                    registry = %self.uri,
                    key,
                    %error,
                    "cannot abort a failed upload; its parts may stay in the store until a \
                     lifecycle rule removes them"
                );
                Some(format!(
                    "the upload could not be aborted either ({error}): its parts may stay in \
                     the store until a lifecycle rule (AbortIncompleteMultipartUpload) removes \
                     them"
                ))
            }
        }
    }

    /// Downloads an object into `dest` (a temporary file the caller renames once it is
    /// satisfied), streaming, and returns its size and sha256.
    pub async fn download(&self, key: &str, dest: &FsPath) -> Result<(u64, String), RegistryError> {
        self.download_at_most(key, dest, None).await
    }

    /// [`Store::download`], refused as [`RegistryError::Corrupt`] as soon as the object is
    /// known to be larger than `max_bytes` (from its metadata, or while it streams: a store
    /// may not say, or may lie), so that a replaced or hostile object costs at most
    /// `max_bytes` of disk and transfer, not its whole size.
    pub async fn download_at_most(
        &self,
        key: &str,
        dest: &FsPath,
        max_bytes: Option<u64>,
    ) -> Result<(u64, String), RegistryError> {
        use tokio::io::AsyncWriteExt;
        let too_large = |size: &dyn std::fmt::Display, max: u64| {
            RegistryError::Corrupt(format!(
                "{key}: the object is {size} bytes, more than the {max} its record says (a \
                 replaced upload); not downloaded further"
            ))
        };
        let got = match self.bulk.get(&self.path(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RegistryError::NotFound(key.to_string()))
            }
            Err(e) => return Err(self.failed("download", key, e)),
        };
        if let Some(max) = max_bytes.filter(|max| got.meta.size > *max) {
            return Err(too_large(&got.meta.size, max));
        }
        let local = |e: std::io::Error| {
            RegistryError::Local(format!("cannot write {}: {e}", dest.display()))
        };
        let mut out = tokio::fs::File::create(dest).await.map_err(local)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.failed("download", key, e))?;
            size += chunk.len() as u64;
            if let Some(max) = max_bytes.filter(|max| size > *max) {
                return Err(too_large(&format_args!("at least {size}"), max));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(local)?;
        }
        out.sync_all().await.map_err(local)?;
        Ok((size, hex::encode(hasher.finalize())))
    }
}
