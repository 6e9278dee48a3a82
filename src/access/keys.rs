//! The API keys file (`--api-keys FILE`, TOML): each key's name, a hash of the key (never the
//! key itself), the models it may call, its limits, priority and expiry. Parsing and checking
//! only; the live limiters are built from it in `limits.rs`.
//!
//! The hash is keyed when the server has a secret (`--api-key-secret-file`): `hmac_sha256`,
//! HMAC-SHA256 under that secret, so that the keys file alone (a backup, a repository) gives
//! nothing to test guesses against. Without a secret it is a plain `sha256`. Why not a slow
//! password hash: the keys are 256-bit random tokens made by `streamserve keys new`, which no
//! dictionary or brute force can find from their hash, and a slow hash (argon2, ~10 ms) would
//! cost that on every request. The file holds only hashes, so a key a person chose cannot be
//! put in it; `keys new` is the way to make one.

use std::path::Path;
use std::time::SystemTime;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::actors::served::Priority;

/// How a key made by `streamserve keys new` starts, so that a leaked one is easy to find in logs
/// or repositories by secret scanners.
pub const KEY_PREFIX: &str = "ssk_";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    /// SHA-256 of the key (no server secret), or
    sha256: Option<String>,
    /// HMAC-SHA256 of the key under the server's secret.
    hmac_sha256: Option<String>,
    /// `"*"` for every model, `"name"` for every version of one, `"name:version"` for one.
    models: Vec<String>,
    #[serde(default)]
    priority: RawPriority,
    /// RFC 3339, e.g. `2027-01-01T00:00:00Z`.
    expires: Option<String>,
    #[serde(flatten)]
    limits: Limits,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawPriority {
    #[default]
    Normal,
    Low,
}

/// A key's limits; `None` (left out) is no limit. A 0 is refused at load: read as "no limit" it
/// would give a key that an operator meant to stop, or to throttle to nothing, no limit at all.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per second, sustained.
    pub requests_per_sec: Option<u32>,
    /// Requests that may come at once above the rate (default: one second's worth).
    pub burst: Option<u32>,
    /// Rows per second over batched requests.
    pub rows_per_sec: Option<u32>,
    /// Inference requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Speech streams open at once.
    pub max_streams: Option<u32>,
    /// Seconds of audio per minute, over all of the key's streams.
    pub audio_secs_per_min: Option<u32>,
}

/// One model (and optionally one version) a key may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Any,
    Model(String),
    Version(String, String),
}

impl Scope {
    fn parse(text: &str) -> Result<Scope, String> {
        match text.split_once(':') {
            _ if text == "*" => Ok(Scope::Any),
            None if !text.is_empty() => Ok(Scope::Model(text.to_string())),
            Some((m, v)) if !m.is_empty() && !v.is_empty() => {
                Ok(Scope::Version(m.to_string(), v.to_string()))
            }
            _ => Err(format!(
                "'{text}' is not a model scope (\"*\", \"name\" or \"name:version\")"
            )),
        }
    }

    /// Whether it covers `model` at all (some version of it).
    pub fn names(&self, model: &str) -> bool {
        match self {
            Scope::Any => true,
            Scope::Model(m) | Scope::Version(m, _) => m == model,
        }
    }

    pub fn covers(&self, model: &str, version: &str) -> bool {
        match self {
            Scope::Any => true,
            Scope::Model(m) => m == model,
            Scope::Version(m, v) => m == model && v == version,
        }
    }
}

/// A key as the file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub name: String,
    pub hash: [u8; 32],
    /// `hash` is HMAC-SHA256 under the server's secret, not plain SHA-256.
    pub keyed: bool,
    pub scopes: Vec<Scope>,
    pub priority: Priority,
    pub expires: Option<SystemTime>,
    pub limits: Limits,
}

/// SHA-256 of a key, as the file stores it without a server secret.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// HMAC-SHA256 of a key under the server's secret, as the file stores it with one.
pub fn keyed_hash(secret: &[u8], key: &str) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(key.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The server's secret for keyed hashes: a file's contents, trimmed.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read API key secret file {}: {e}", path.display()))?;
    let secret = text.trim();
    if secret.len() < 16 {
        return Err(format!(
            "API key secret file {} must hold at least 16 characters",
            path.display()
        ));
    }
    Ok(secret.as_bytes().to_vec())
}

/// A new random key (256 bits), with its prefix.
pub fn new_key() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness from the OS: {e}"))?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

/// Reads the keys file; `keyed` says whether the server has a secret for `hmac_sha256` keys.
pub fn load(path: &Path, keyed: bool) -> Result<Vec<KeySpec>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read API keys file {}: {e}", path.display()))?;
    from_bytes(path, &bytes, keyed)
}

/// The keys file's contents, read from `path` (named in errors).
pub fn from_bytes(path: &Path, bytes: &[u8], keyed: bool) -> Result<Vec<KeySpec>, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("API keys file {} is not UTF-8 text", path.display()))?;
    parse(text, keyed).map_err(|e| format!("API keys file {}: {e}", path.display()))
}

pub fn parse(text: &str, has_secret: bool) -> Result<Vec<KeySpec>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut specs: Vec<KeySpec> = Vec::with_capacity(raw.keys.len());
    for key in raw.keys {
        let name = key.name;
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !valid_name {
            return Err(format!(
                "key name '{name}' must be 1-64 letters, digits, '_', '-' or '.' (it labels metrics)"
            ));
        }
        if name == "-" {
            return Err(
                "a key may not be named '-': metrics and logs name callers without a key so".into(),
            );
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(format!("two keys are named '{name}'"));
        }
        let (field, hex_hash, keyed) = match (&key.sha256, &key.hmac_sha256) {
            (Some(h), None) => ("sha256", h, false),
            (None, Some(h)) if has_secret => ("hmac_sha256", h, true),
            (None, Some(_)) => {
                return Err(format!(
                    "key '{name}' has an hmac_sha256, but the server has no --api-key-secret-file"
                ))
            }
            _ => {
                return Err(format!(
                    "key '{name}' needs one of sha256 or hmac_sha256 (`streamserve keys new` prints it)"
                ))
            }
        };
        let hash: [u8; 32] = hex::decode(hex_hash)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "key '{name}': {field} must be 64 hex digits (`streamserve keys new` prints it)"
                )
            })?;
        if specs.iter().any(|s| s.hash == hash) {
            return Err(format!("key '{name}' has the same hash as another key"));
        }
        if key.models.is_empty() {
            return Err(format!(
                "key '{name}' names no models; use [\"*\"] for every model"
            ));
        }
        let scopes = key
            .models
            .iter()
            .map(|m| Scope::parse(m))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("key '{name}': {e}"))?;
        check_limits(&name, &key.limits)?;
        let expires = key
            .expires
            .as_deref()
            .map(humantime::parse_rfc3339)
            .transpose()
            .map_err(|e| {
                format!("key '{name}': expires must be RFC 3339 (2027-01-01T00:00:00Z): {e}")
            })?;
        specs.push(KeySpec {
            name,
            hash,
            keyed,
            scopes,
            priority: match key.priority {
                RawPriority::Normal => Priority::Normal,
                RawPriority::Low => Priority::Low,
            },
            expires,
            limits: key.limits,
        });
    }
    if specs.is_empty() {
        // A server that requires keys and knows none refuses every call: never what is meant,
        // and what a file caught half-written (truncated, not yet filled) looks like.
        return Err(
            "it declares no keys ([[keys]] entries); every call would be refused. \
                    Add a key (`streamserve keys new`), or serve without --api-keys"
                .into(),
        );
    }
    Ok(specs)
}

/// Refuses a limit of 0 (see [`Limits`]), and a `burst` without the rate it is above.
fn check_limits(name: &str, limits: &Limits) -> Result<(), String> {
    let fields = [
        ("requests_per_sec", limits.requests_per_sec),
        ("burst", limits.burst),
        ("rows_per_sec", limits.rows_per_sec),
        ("max_concurrent", limits.max_concurrent),
        ("max_streams", limits.max_streams),
        ("audio_secs_per_min", limits.audio_secs_per_min),
    ];
    if let Some((field, _)) = fields.iter().find(|(_, value)| *value == Some(0)) {
        return Err(format!(
            "key '{name}': {field} = 0 is not a limit: leave {field} out for no limit, and \
             remove the key (or give it an `expires` in the past) to stop it"
        ));
    }
    if limits.burst.is_some() && limits.requests_per_sec.is_none() {
        return Err(format!(
            "key '{name}': burst needs requests_per_sec, the rate it is a burst above"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";

    #[test]
    fn a_keys_file_parses_with_scopes_limits_and_expiry() {
        let text = format!(
            "[[keys]]\nname = \"web\"\nsha256 = \"{SHA}\"\nmodels = [\"mlp\", \"silero_vad:1\"]\n\
             requests_per_sec = 100\nburst = 20\nmax_streams = 2\npriority = \"low\"\n\
             expires = \"2027-01-01T00:00:00Z\"\n"
        );
        let keys = parse(&text, false).unwrap();
        assert_eq!(keys.len(), 1);
        let key = &keys[0];
        assert_eq!(key.name, "web");
        assert_eq!(key.priority, Priority::Low);
        assert_eq!(key.limits.requests_per_sec, Some(100));
        assert_eq!(key.limits.max_streams, Some(2));
        assert!(key.scopes[0].covers("mlp", "7"));
        assert!(key.scopes[1].covers("silero_vad", "1"));
        assert!(!key.scopes[1].covers("silero_vad", "2"));
        assert!(key.scopes[1].names("silero_vad"));
        assert!(key.expires.is_some());
    }

    #[test]
    fn mistakes_in_the_file_are_refused_with_the_key_named() {
        let one = |extra: &str| {
            format!("[[keys]]\nname = \"k\"\nsha256 = \"{SHA}\"\nmodels = [\"*\"]\n{extra}")
        };
        for (text, says) in [
            (one("rate = 1\n"), "unknown field"),
            (one("expires = \"tomorrow\"\n"), "RFC 3339"),
            (one("priority = \"urgent\"\n"), "priority"),
            (
                "[[keys]]\nname = \"k\"\nsha256 = \"abc\"\nmodels = [\"*\"]\n".to_string(),
                "64 hex digits",
            ),
            (
                format!("[[keys]]\nname = \"k\"\nsha256 = \"{SHA}\"\nmodels = []\n"),
                "names no models",
            ),
            (
                format!("[[keys]]\nname = \"k\"\nsha256 = \"{SHA}\"\nmodels = [\"m:\"]\n"),
                "not a model scope",
            ),
            (
                format!("[[keys]]\nname = \"a b\"\nsha256 = \"{SHA}\"\nmodels = [\"*\"]\n"),
                "must be 1-64",
            ),
            (format!("{}{}", one(""), one("")), "two keys are named"),
            (one("").replace("\"k\"", "\"-\""), "named '-'"),
            (one("max_streams = 0\n"), "max_streams = 0 is not a limit"),
            (one("burst = 3\n"), "burst needs requests_per_sec"),
            (String::new(), "declares no keys"),
        ] {
            let err = parse(&text, false).unwrap_err();
            assert!(err.contains(says), "{text}\n=> {err}");
        }
    }

    #[test]
    fn keyed_hashes_need_the_servers_secret() {
        let text = format!("[[keys]]\nname = \"k\"\nhmac_sha256 = \"{SHA}\"\nmodels = [\"*\"]\n");
        assert!(parse(&text, false)
            .unwrap_err()
            .contains("--api-key-secret-file"));
        assert!(parse(&text, true).unwrap()[0].keyed);
        let both = format!(
            "[[keys]]\nname = \"k\"\nsha256 = \"{SHA}\"\nhmac_sha256 = \"{SHA}\"\nmodels = [\"*\"]\n"
        );
        assert!(parse(&both, true)
            .unwrap_err()
            .contains("one of sha256 or hmac_sha256"));
        // RFC 4231, test case 2.
        assert_eq!(
            hex::encode(keyed_hash(b"Jefe", "what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn new_keys_are_random_prefixed_and_hash_to_what_the_file_holds() {
        let (a, b) = (new_key().unwrap(), new_key().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 64);
        assert_eq!(hex::encode(hash("password")), SHA);
    }
}
