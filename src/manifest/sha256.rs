//! Model files against the manifest: a file's sha256, and the check that refuses a corrupted
//! or swapped file before it is ever loaded.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::ModelEntry;

/// Hashes the model file and compares it with the manifest, so that a corrupted or swapped
/// file is refused before it is ever loaded.
pub fn verify_sha256(entry: &ModelEntry) -> Result<(), String> {
    let actual = sha256_file(&entry.file)
        .map_err(|e| format!("cannot read model file {}: {e}", entry.file.display()))?;
    if actual != entry.sha256 {
        return Err(format!(
            "sha256 mismatch for {}: manifest says {}, file has {}",
            entry.file.display(),
            entry.sha256,
            actual
        ));
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
