//! The fleet agent: what makes this instance one of a fleet that a model registry drives
//! (`serve --registry URI`). Every poll it reads each model's desired state (conditionally:
//! unchanged documents cost a 304), takes the versions it needs into the local cache
//! (downloaded in the background, sha256-verified), asks the supervisor to route each model
//! as the desired state says ([`Route`]), judges its own part in a rollout ([`part`]), writes
//! its heartbeat report, and, where the live instances' reports say a rollout should move on,
//! records that in the desired state (a conditional write: one instance wins, all follow).
//!
//! The agent is one task that owns its state ([`agent`]); the rest of the server holds a
//! [`Fleet`] handle: its status for `GET /admin/registry`, [`Fleet::fetch`] for an admin
//! deployment of a version that only the registry has, and [`Fleet::leave`] at shutdown.
//!
//! When the registry cannot be reached, the instance keeps serving what it has (at startup:
//! the desired states and versions its cache kept), says so in its status and metrics, and
//! catches up when the registry is back.

mod agent;
mod part;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use tokio::sync::watch;

use crate::actors::catalog::SharedCatalog;
use crate::actors::supervisor::{AddVersions, Route, Supervisor};
use crate::manifest::Manifest;
use crate::registry::cache::Cache;
use crate::registry::{ops, RegistryError, Store};

/// How an instance follows a registry.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// The registry's URI (`s3://bucket/prefix`, `file:///dir`, ...).
    pub registry: String,
    /// Where downloaded versions are kept (one folder per registry inside).
    pub cache_dir: PathBuf,
    /// This instance's name in the fleet.
    pub instance_id: String,
    /// Where others can reach it, for `registry status`.
    pub url: Option<String>,
    pub poll: Duration,
}

/// The handle on the fleet agent (cheap to clone).
#[derive(Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    cache: Cache,
    options: FleetOptions,
    supervisor: Addr<Supervisor>,
    catalog: Arc<SharedCatalog>,
    /// The agent's last account of itself, for the admin API.
    status: Mutex<serde_json::Value>,
    /// True once the first poll has brought every model's default in (or given up on it).
    synced: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    /// Polls at once (a fetch finished: its version can be routed now, not a poll later).
    wake: tokio::sync::Notify,
    /// The agent's task, stopped (mid-poll if need be) before the instance leaves.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Fleet {
    /// Opens the registry and the cache, and starts the agent on the current actix system.
    pub fn start(
        options: FleetOptions,
        supervisor: Addr<Supervisor>,
        catalog: Arc<SharedCatalog>,
    ) -> Result<Fleet, RegistryError> {
        crate::registry::check_name("instance id", &options.instance_id)?;
        let store = Store::open(&options.registry)?;
        let cache = Cache::open(&options.cache_dir, store.uri())?;
        let fleet = Fleet {
            shared: Arc::new(Shared {
                store,
                cache,
                options,
                supervisor,
                catalog,
                status: Mutex::new(serde_json::Value::Null),
                synced: watch::channel(false).0,
                stop: watch::channel(false).0,
                wake: tokio::sync::Notify::new(),
                task: Mutex::new(None),
            }),
        };
        tracing::info!(
            registry = %fleet.shared.store.uri(),
            instance = %fleet.shared.options.instance_id,
            poll_ms = fleet.shared.options.poll.as_millis() as u64,
            cache = %fleet.shared.cache.root().display(),
            "following the model registry"
        );
        crate::telemetry::register_fleet_series();
        let task = actix_web::rt::spawn(agent::Agent::new(fleet.clone()).run());
        *fleet.shared.task.lock().expect("task lock") = Some(task);
        Ok(fleet)
    }

    /// Waits until the first poll has brought every model's default in (or failed to), at
    /// most `timeout`: so that a new instance does not take traffic with stale versions.
    pub async fn wait_synced(&self, timeout: Duration) {
        let mut synced = self.shared.synced.subscribe();
        if tokio::time::timeout(timeout, synced.wait_for(|s| *s))
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_secs = timeout.as_secs(),
                "the registry's desired state is not all loaded yet; serving what is"
            );
        }
    }

    /// The agent's last account: the registry, its reachability, each model's desired state
    /// and this instance's routing of it.
    pub fn status(&self) -> serde_json::Value {
        self.shared.status.lock().expect("status lock").clone()
    }

    /// Takes `name:version` from the registry (its record, and its file into the cache) and
    /// lists it with the supervisor, so that it can be loaded and deployed here. A name the
    /// registry cannot hold (an admin request's `"version": "../x"`) is not in it: 404, as
    /// for any other version it lacks, not the 409 of a refused registry operation.
    pub async fn fetch(&self, name: &str, version: &str) -> Result<(), RegistryError> {
        if let Err(e) = crate::registry::check_name("model name", name)
            .and_then(|()| crate::registry::check_name("version", version))
        {
            return Err(RegistryError::NotFound(format!(
                "{}:{} ({e})",
                crate::untrusted::Untrusted(name),
                crate::untrusted::Untrusted(version)
            )));
        }
        let shared = &self.shared;
        let record = match ops::record(&shared.store, name, version).await {
            Ok(record) => {
                shared.cache.save_record(&record)?;
                record
            }
            // Unreachable: what the cache kept from before will do.
            Err(e @ RegistryError::Unreachable(_)) => {
                shared.cache.load_record(name, version).ok_or(e)?
            }
            Err(e) => return Err(e),
        };
        let file = shared.cache.fetch(&shared.store, &record).await?;
        self.add_version(&record, &file).await
    }

    /// `name:version` from the cache alone (its record and its verified file), listed with
    /// the supervisor without a word to the registry: for when the registry does not answer.
    /// Returns its sha256.
    async fn take_cached(&self, name: &str, version: &str) -> Result<String, RegistryError> {
        let cache = &self.shared.cache;
        let missing = || {
            RegistryError::Unreachable(format!(
                "{name}:{version} is not in this instance's cache, and the registry does not answer"
            ))
        };
        let record = cache.load_record(name, version).ok_or_else(missing)?;
        let file = cache.local(&record).await?.ok_or_else(missing)?;
        self.add_version(&record, &file).await?;
        Ok(record.sha256)
    }

    async fn add_version(
        &self,
        record: &crate::registry::records::VersionRecord,
        file: &std::path::Path,
    ) -> Result<(), RegistryError> {
        let (name, version) = (&record.name, &record.version);
        let entry = Manifest::registry_entry(name, version, file, &record.sha256, &record.settings)
            .map_err(|e| RegistryError::Corrupt(format!("{name}:{version}: {e:#}")))?;
        let mut answers = self
            .shared
            .supervisor
            .send(AddVersions(vec![entry]))
            .await
            .map_err(|_| RegistryError::Local("the server is stopping".into()))?;
        answers
            .pop()
            .unwrap_or(Ok(()))
            .map_err(RegistryError::Refused)
    }

    /// Stops the agent and takes this instance's report out of the registry, so that the
    /// fleet stops counting it at once (a rollout does not wait for it).
    pub async fn leave(&self) {
        let _ = self.shared.stop.send(true);
        // A poll in flight would write the report again after the delete below.
        if let Some(task) = self.shared.task.lock().expect("task lock").take() {
            task.abort();
        }
        let key = crate::registry::instance_key(&self.shared.options.instance_id);
        match self.shared.store.delete(&key).await {
            Ok(()) => tracing::info!("left the fleet"),
            Err(e) => {
                tracing::warn!(error = %e, "could not take this instance's report out of the registry")
            }
        }
    }

    fn send_route(
        &self,
        route: Route,
    ) -> impl std::future::Future<Output = Option<crate::actors::supervisor::RouteOutcome>> {
        let supervisor = self.shared.supervisor.clone();
        async move { supervisor.send(route).await.ok() }
    }
}

/// An instance id when none is configured: fly.io's machine id where there is one, else the
/// host name and a random suffix (unique per process start).
pub fn default_instance_id() -> String {
    if let Ok(id) = std::env::var("FLY_MACHINE_ID") {
        if crate::registry::check_name("instance id", &id).is_ok() {
            return id;
        }
    }
    let host: String = std::fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let host = if host.is_empty() {
        "streamserve".into()
    } else {
        host
    };
    format!("{host}-{:06x}", fastrand::u32(..0x100_0000))
}
