//! What the `streamserve registry` commands do, against a [`Store`]: publish a version
//! ([`push`]), seed a registry from a model directory ([`seed`]), list what is there
//! ([`list`]), change a model's desired state ([`deploy`], [`rollback`]) and read the fleet's
//! ([`status`]). Printing is the command line's; these return values and typed errors.
//!
//! Desired-state changes go through [`update_desired`]: read with the ETag, change, write with
//! `If-Match`, and on a conflict start again from the new document, so that two racing
//! `deploy` commands cannot both win: the second one sees the first one's rollout and is
//! refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::fleet::{self, DeployRequest};
use super::records::{Desired, InstanceReport, Interface, VersionRecord, FORMAT};
use super::store::{Expected, Read, WriteIf, MAX_DOCUMENT_BYTES};
use super::{check_name, desired_key, file_key, now_ms, version_key, RegistryError, Store};
use crate::manifest::{compare_versions, sha256_file, Manifest, MANIFEST_FILE};
use crate::monitor::probe::Probe;
use crate::monitor::profile::Profile;
use serde_json::Value;

/// A version to publish.
#[derive(Debug)]
pub struct Push {
    pub name: String,
    pub version: String,
    pub file: PathBuf,
    /// The serving settings (a `[[models]]` entry's keys, less its identity).
    pub settings: toml::Table,
    pub interface: Option<Interface>,
    pub by: String,
    /// The sha256 the file must have (a manifest's), or the push is refused.
    pub expect_sha256: Option<String>,
}

/// Publishes a version: checks its settings, uploads its file, then writes its record, only
/// if no record of that version exists (versions are immutable). Returns the record.
pub async fn push(store: &Store, push: Push) -> Result<VersionRecord, RegistryError> {
    check_name("model name", &push.name)?;
    check_name("version", &push.version)?;
    let record_key = version_key(&push.name, &push.version);
    if store.exists(&record_key).await? {
        return Err(exists(&push.name, &push.version));
    }
    let file = push.file.clone();
    // Size and hash from one read: the file's metadata may say another size than the bytes
    // read (a file being written, a pipe).
    let (size, sha256) = tokio::task::spawn_blocking(move || hash_file(&file))
        .await
        .map_err(|e| RegistryError::Local(e.to_string()))?
        .map_err(|e| RegistryError::Local(format!("cannot read {}: {e}", push.file.display())))?;
    if let Some(expected) = push.expect_sha256.as_deref().filter(|e| *e != sha256) {
        return Err(RegistryError::Refused(format!(
            "{}:{}: {} has sha256 {sha256}, its manifest says {expected} (a corrupt or \
             replaced copy); not published",
            push.name,
            push.version,
            push.file.display()
        )));
    }
    let entry = Manifest::registry_entry(
        &push.name,
        &push.version,
        &push.file,
        &sha256,
        &push.settings,
    )
    .map_err(|e| RegistryError::Refused(format!("serving settings: {e:#}")))?;
    let (profile, probe) = companions(&push.file, &sha256)?;
    // The file first, under its hash: a record never names a file that is not there, and two
    // racing pushes of one version upload to different names, so the loser cannot replace
    // the winner's file. The upload is read again, and completed only if those bytes are
    // the ones hashed above: a file rewritten in between is refused, not stored under a
    // hash that every instance would then find wrong.
    store
        .upload_exact(
            &file_key(&push.name, &push.version, &sha256),
            &push.file,
            Expected {
                size,
                sha256: &sha256,
            },
        )
        .await?;
    let record = VersionRecord {
        format: FORMAT,
        name: push.name.clone(),
        version: push.version.clone(),
        file: format!("{sha256}.onnx"),
        sha256,
        size,
        settings: push.settings,
        interface: push.interface,
        description: entry.description,
        source: entry.source,
        pushed_by: push.by,
        pushed_at_ms: now_ms(),
        profile,
        probe,
    };
    let size = serde_json::to_vec(&record).map_or(0, |v| v.len() as u64);
    if size > MAX_DOCUMENT_BYTES {
        return Err(RegistryError::Refused(format!(
            "{}:{}: its record with profile.json and probe.json is {size} bytes, more than a \
             registry document may be ({MAX_DOCUMENT_BYTES}): use a smaller golden input",
            push.name, push.version
        )));
    }
    match store
        .write_json(&record_key, &record, WriteIf::Absent)
        .await
    {
        Ok(_) => Ok(record),
        Err(RegistryError::Conflict(_)) => Err(exists(&push.name, &push.version)),
        Err(e) => Err(e),
    }
}

/// The version's `profile.json` and `probe.json` from beside its model file, each checked as
/// the server checks them when it loads a version (a profile made for other weights, or a
/// probe that does not parse, refuses the push rather than the later deployment).
fn companions(file: &Path, sha256: &str) -> Result<(Option<Value>, Option<Value>), RegistryError> {
    let refused = |e: String| RegistryError::Refused(e);
    let as_value = |path: PathBuf| -> Result<Value, RegistryError> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| RegistryError::Local(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| refused(format!("{}: {e}", path.display())))
    };
    let profile = match Profile::load_beside(file, sha256).map_err(refused)? {
        Some(_) => Some(as_value(Profile::path_beside(file))?),
        None => None,
    };
    let probe = match Probe::load_beside(file).map_err(refused)? {
        Some(_) => Some(as_value(Probe::path_beside(file))?),
        None => None,
    };
    Ok((profile, probe))
}

/// A file's size and sha256, from one read of it.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok((size, hex::encode(hasher.finalize())));
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
}

fn exists(name: &str, version: &str) -> RegistryError {
    RegistryError::Refused(format!(
        "{name}:{version} is already in the registry; versions are immutable: push a new version"
    ))
}

/// Reads a version's record.
pub async fn record(
    store: &Store,
    name: &str,
    version: &str,
) -> Result<VersionRecord, RegistryError> {
    check_name("model name", name)?;
    check_name("version", version)?;
    match store
        .read_json::<VersionRecord>(&version_key(name, version), None)
        .await?
    {
        Read::Found(found) if found.value.format <= FORMAT => {
            check_record(&found.value, name, version)?;
            Ok(found.value)
        }
        Read::Found(found) => Err(newer_format("version record", found.value.format)),
        Read::Missing | Read::Unchanged => {
            Err(RegistryError::NotFound(format!("{name}:{version}")))
        }
    }
}

/// A record names what its place says, and a file by a real sha256: its fields become
/// object keys and cache paths.
fn check_record(record: &VersionRecord, name: &str, version: &str) -> Result<(), RegistryError> {
    let sha_ok = record.sha256.len() == 64
        && record
            .sha256
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
    if record.name != name
        || record.version != version
        || !sha_ok
        || record.file != format!("{}.onnx", record.sha256)
    {
        return Err(RegistryError::Corrupt(format!(
            "{}: the record does not match its place (name, version, sha256 or file)",
            version_key(name, version)
        )));
    }
    Ok(())
}

fn newer_format(what: &str, format: u32) -> RegistryError {
    RegistryError::Corrupt(format!(
        "the {what} has format {format}, newer than this streamserve reads ({FORMAT}); upgrade it"
    ))
}

/// Reads a model's desired state and the condition to write it back under (a model with
/// none yet starts from an empty one, written only if still absent).
pub async fn read_desired(store: &Store, name: &str) -> Result<(Desired, WriteIf), RegistryError> {
    match store.read_json::<Desired>(&desired_key(name), None).await? {
        Read::Found(found) if found.value.format > FORMAT => {
            Err(newer_format("desired state", found.value.format))
        }
        Read::Found(found) if found.value.model != name => Err(RegistryError::Corrupt(format!(
            "{}: it is the desired state of '{}'",
            desired_key(name),
            crate::untrusted::Untrusted(&found.value.model)
        ))),
        Read::Found(found) => {
            let condition = match found.tag.etag {
                Some(_) => WriteIf::Matches(found.tag),
                None => WriteIf::Always,
            };
            Ok((found.value, condition))
        }
        Read::Missing | Read::Unchanged => Ok((Desired::new(name), WriteIf::Absent)),
    }
}

/// Times a desired-state change is re-tried from a fresh read after losing a race.
const UPDATE_TRIES: usize = 8;

/// Changes `name`'s desired state with `change`, conditionally (see the module header).
pub async fn update_desired(
    store: &Store,
    name: &str,
    change: impl Fn(&Desired) -> Result<Desired, RegistryError>,
) -> Result<Desired, RegistryError> {
    for _ in 0..UPDATE_TRIES {
        let (current, condition) = read_desired(store, name).await?;
        let next = change(&current)?;
        if next == current && !matches!(condition, WriteIf::Absent) {
            return Ok(next);
        }
        match store.write_json(&desired_key(name), &next, condition).await {
            Ok(_) => return Ok(next),
            Err(RegistryError::Conflict(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(20 + fastrand::u64(..80)))
                    .await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(RegistryError::Conflict(desired_key(name)))
}

/// Starts a rollout of `request.version` (which must be in the registry).
pub async fn deploy(
    store: &Store,
    name: &str,
    request: DeployRequest,
) -> Result<Desired, RegistryError> {
    record(store, name, &request.version).await?;
    let now = now_ms();
    update_desired(store, name, |d| fleet::start(d, request.clone(), now)).await
}

/// Stops `name`'s rollout, or puts its previous (or `to`) version back as the default.
pub async fn rollback(
    store: &Store,
    name: &str,
    to: Option<&str>,
    by: &str,
    reason: &str,
) -> Result<Desired, RegistryError> {
    check_name("model name", name)?;
    if let Some(to) = to {
        record(store, name, to).await?;
    }
    let now = now_ms();
    update_desired(store, name, |d| {
        if d.default.is_none() && d.rollout.is_none() {
            return Err(RegistryError::NotFound(format!(
                "a desired state of '{name}'"
            )));
        }
        fleet::roll_back(d, to, by, reason, now)
    })
    .await
}

/// One model as [`list`] finds it.
#[derive(Debug, serde::Serialize)]
pub struct ModelListing {
    pub name: String,
    pub desired: Option<Desired>,
    pub versions: Vec<VersionRecord>,
    /// Versions whose record cannot be read, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub broken: Vec<(String, String)>,
}

/// What [`list`] found, and what it could not read on the way (bad keys).
#[derive(Debug)]
pub struct Listings {
    pub models: Vec<ModelListing>,
    pub warnings: Vec<String>,
}

/// Every model (or only `only`) with its versions, oldest first, and its desired state.
pub async fn list(store: &Store, only: Option<&str>) -> Result<Listings, RegistryError> {
    let mut warnings = Vec::new();
    let names = match only {
        Some(name) => vec![name.to_string()],
        None => model_names(store, &mut warnings).await?,
    };
    let mut listings = Vec::new();
    for name in names {
        let mut versions = Vec::new();
        let mut broken = Vec::new();
        let listed = match store
            .list_dirs(&format!("{}/{name}", super::MODELS_DIR))
            .await
        {
            Ok(listed) => listed,
            Err(RegistryError::Corrupt(reason)) => {
                warnings.push(reason);
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        for version in listed {
            match record(store, &name, &version).await {
                Ok(record) => versions.push(record),
                // A folder without a record: an upload in progress or abandoned.
                Err(RegistryError::NotFound(_)) => {}
                Err(e @ (RegistryError::Corrupt(_) | RegistryError::Refused(_))) => {
                    broken.push((version, e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        versions.sort_by(|a, b| compare_versions(&a.version, &b.version));
        let desired = match read_desired(store, &name).await? {
            (desired, WriteIf::Absent) if desired.history.is_empty() => None,
            (desired, _) => Some(desired),
        };
        if versions.is_empty() && broken.is_empty() && desired.is_none() {
            continue;
        }
        listings.push(ModelListing {
            name,
            desired,
            versions,
            broken,
        });
    }
    Ok(Listings {
        models: listings,
        warnings,
    })
}

/// The models under `models/`; when a bad key there fails the listing, the models the
/// instances report instead (with a warning): one stray object must not hide the rest.
async fn model_names(
    store: &Store,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>, RegistryError> {
    match store.list_dirs(super::MODELS_DIR).await {
        Ok(names) => Ok(names),
        Err(RegistryError::Corrupt(reason)) => {
            warnings.push(format!("{reason}; showing the models the instances report"));
            let reports = instances(store)
                .await
                .map(|r| r.reports)
                .unwrap_or_default();
            let names: std::collections::BTreeSet<String> = reports
                .into_iter()
                .flat_map(|r| r.models.into_keys())
                .filter(|name| check_name("model name", name).is_ok())
                .collect();
            Ok(names.into_iter().collect())
        }
        Err(e) => Err(e),
    }
}

/// The instance reports [`instances`] read, and why it left others out.
#[derive(Debug, Default)]
pub struct InstanceReports {
    /// Each one's id is its file's name (`instances/<id>.json`), so `instance_key(id)` is the
    /// object it was read from.
    pub reports: Vec<InstanceReport>,
    /// Reports that cannot be read (not a report, too large, a newer format) or that name
    /// another instance than their file: one line each.
    pub skipped: Vec<String>,
}

/// Every instance that has reported, live or not, ordered by id. One unreadable report is
/// skipped (and said so), not a failure of the whole read: the fleet goes on without it.
pub async fn instances(store: &Store) -> Result<InstanceReports, RegistryError> {
    let mut found = InstanceReports::default();
    for file in store.list_files(super::INSTANCES_DIR).await? {
        let Some(id) = file.strip_suffix(".json") else {
            continue;
        };
        let key = super::instance_key(id);
        let skip = |why: String| format!("{}: {why}; skipped", crate::untrusted::Untrusted(&key));
        if check_name("instance id", id).is_err() {
            found.skipped.push(skip("not an instance id".into()));
            continue;
        }
        match store.read_json::<InstanceReport>(&key, None).await {
            Ok(Read::Found(report)) if report.value.format > FORMAT => found.skipped.push(skip(
                newer_format("instance report", report.value.format).to_string(),
            )),
            // Another instance's name in this file: deleting or counting it by that name
            // would act on the other instance.
            Ok(Read::Found(report)) if report.value.id != id => found.skipped.push(skip(format!(
                "it says it is instance '{}'",
                crate::untrusted::Untrusted(&report.value.id)
            ))),
            Ok(Read::Found(report)) => found.reports.push(report.value),
            // One that went away between the listing and the read is simply not there.
            Ok(Read::Missing | Read::Unchanged) => {}
            Err(RegistryError::Corrupt(reason)) => found
                .skipped
                .push(format!("{}; skipped", crate::untrusted::Untrusted(&reason))),
            Err(e) => return Err(e),
        }
    }
    found.reports.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

/// The whole fleet: each model's desired state and every instance's report, read at `now_ms`.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub registry: String,
    pub now_ms: u64,
    pub models: Vec<Desired>,
    pub instances: Vec<InstanceReport>,
    /// What could not be read (bad keys, unreadable reports): the rest is shown without it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

pub async fn status(store: &Store) -> Result<Status, RegistryError> {
    let mut warnings = Vec::new();
    let mut models = Vec::new();
    for name in model_names(store, &mut warnings).await? {
        match read_desired(store, &name).await {
            Ok((desired, WriteIf::Matches(_) | WriteIf::Always)) => models.push(desired),
            Ok(_) => {}
            Err(RegistryError::Corrupt(reason)) => warnings.push(reason),
            Err(e) => return Err(e),
        }
    }
    let reports = match instances(store).await {
        Ok(found) => {
            warnings.extend(found.skipped);
            found.reports
        }
        Err(RegistryError::Corrupt(reason)) => {
            warnings.push(reason);
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    Ok(Status {
        registry: store.uri().to_string(),
        now_ms: now_ms(),
        models,
        instances: reports,
        warnings,
    })
}

/// What [`seed`] did with each version of the model directory.
#[derive(Debug, serde::Serialize)]
pub struct Seeded {
    pub pushed: Vec<String>,
    /// Already there with the same sha256.
    pub present: Vec<String>,
    /// Models whose desired default this set.
    pub defaults: BTreeMap<String, String>,
}

/// Publishes every version of a model directory (`models.toml`, its `[defaults]` folded into
/// each version's settings) and gives each model without a default its manifest default (its
/// highest eagerly loaded version). Versions already there are left alone if their sha256 is
/// the same, and refused if it differs.
pub async fn seed(store: &Store, dir: &Path, by: &str) -> Result<Seeded, RegistryError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| RegistryError::Local(format!("cannot read {}: {e}", path.display())))?;
    let bad = |e: anyhow::Error| RegistryError::Refused(format!("{}: {e:#}", path.display()));
    let manifest = Manifest::parse(dir, &text).map_err(bad)?;
    let settings = Manifest::settings_tables(&text).map_err(bad)?;
    let mut seeded = Seeded {
        pushed: Vec::new(),
        present: Vec::new(),
        defaults: BTreeMap::new(),
    };
    for (entry, settings) in manifest.models.iter().zip(settings) {
        let label = format!("{}:{}", entry.name, entry.version);
        match record(store, &entry.name, &entry.version).await {
            Ok(existing) if existing.sha256 == entry.sha256 => {
                seeded.present.push(label);
                continue;
            }
            Ok(existing) => {
                let file = entry.file.clone();
                let actual = tokio::task::spawn_blocking(move || sha256_file(&file))
                    .await
                    .map_err(|e| RegistryError::Local(e.to_string()))?
                    .map_or_else(
                        |e| format!("unreadable ({e})"),
                        |sha| format!("sha256 {sha}"),
                    );
                return Err(RegistryError::Refused(format!(
                    "{label} is in the registry with sha256 {}; the directory's manifest says \
                     {}, its file {} has {actual}; versions are immutable",
                    existing.sha256,
                    entry.sha256,
                    entry.file.display()
                )));
            }
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        push(
            store,
            Push {
                name: entry.name.clone(),
                version: entry.version.clone(),
                file: entry.file.clone(),
                settings,
                interface: None,
                by: by.to_string(),
                expect_sha256: Some(entry.sha256.clone()),
            },
        )
        .await?;
        seeded.pushed.push(label);
    }
    let mut names: Vec<&str> = manifest.models.iter().map(|m| m.name.as_str()).collect();
    names.dedup();
    names.sort();
    names.dedup();
    for name in names {
        let highest = |lazy: bool| {
            manifest
                .models
                .iter()
                .filter(|m| m.name == name && m.lazy == lazy)
                .map(|m| m.version.clone())
                .max_by(|a, b| compare_versions(a, b))
        };
        let Some(default) = highest(false).or_else(|| highest(true)) else {
            continue;
        };
        let now = now_ms();
        let set = update_desired(store, name, |d| {
            let mut next = d.clone();
            if next.default.is_none() && next.rollout.is_none() {
                next.format = FORMAT;
                next.default = Some(default.clone());
                next.record(super::records::Event {
                    at_ms: now,
                    event: super::records::EventKind::Switched,
                    version: default.clone(),
                    from: None,
                    strategy: None,
                    by: by.to_string(),
                    reason: Some("seeded from a model directory".into()),
                });
            }
            Ok(next)
        })
        .await?;
        if set.default.as_deref() == Some(default.as_str()) {
            seeded.defaults.insert(name.to_string(), default);
        }
    }
    Ok(seeded)
}
