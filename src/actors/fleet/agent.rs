//! The fleet agent's loop: one task, which owns what it knows of the registry (the desired
//! states with their ETags, the versions it listed or is fetching, its part in each rollout)
//! and polls: read, fetch, route, judge, report, decide (its rollout part: `rollouts.rs`). See
//! the module header of `fleet`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use futures_util::FutureExt;
use tokio::task::JoinHandle;

mod heartbeat;
mod report;
mod rollouts;
mod startup;

use super::part::Part;
use super::Fleet;
use crate::actors::catalog::Canary;
use crate::actors::supervisor::{Readiness, Route, RouteOutcome};
use crate::registry::fleet;
use crate::registry::records::{Desired, InstanceReport, FORMAT};
use crate::registry::store::{Read, Tag};
use crate::registry::{desired_key, instance_key, now_ms, RegistryError};

/// A model version: (name, version).
type Key = (String, String);

/// A failed fetch is tried again after this long (a network error may pass)...
const FETCH_RETRY_MS: u64 = 10_000;
/// ...and one whose object is not what its record says after this long: versions are
/// immutable, so a corrupt object stays corrupt, and each try may cost its whole size.
const CORRUPT_RETRY_MS: u64 = 300_000;
/// Reports older than this are taken out of the registry (an instance that died without
/// leaving).
const STALE_REPORT_MS: u64 = 3_600_000;

pub(super) struct Agent {
    fleet: Fleet,
    started_at_ms: u64,
    /// This process's nonce in its report (see `heartbeat`).
    boot: String,
    /// The version of the report this process wrote last: the next write is conditional on
    /// it, so that a write by anyone else in between is noticed.
    report_tag: Option<Tag>,
    /// Another process writing this instance's report: what it is, and when it was last seen.
    duplicate: Option<(String, u64)>,
    /// Each model's desired state, with the version it was read at (`None`: from the cache).
    desired: BTreeMap<String, (Desired, Option<Tag>)>,
    /// Versions listed with the supervisor.
    listed: HashSet<Key>,
    /// Each version's sha256 as its registry record says, once read: a route names the
    /// file it means, so that a bundled file of the same label is never taken for it.
    sha256: HashMap<Key, String>,
    fetching: HashMap<Key, JoinHandle<Result<(), RegistryError>>>,
    /// Versions that could not be fetched or listed: why, and when.
    unavailable: HashMap<Key, (RegistryError, u64)>,
    /// The last routing sent per model, and whether it settled (every version ready or failed).
    sent: HashMap<String, (Route, bool)>,
    outcomes: HashMap<String, RouteOutcome>,
    parts: HashMap<String, Part>,
    /// The other live instances' reports, as last read.
    others: Vec<InstanceReport>,
    /// Whether `others` was read this poll: decisions are made only from a fresh view.
    others_fresh: bool,
    /// This instance's last report.
    mine: InstanceReport,
    /// Whether the registry answered this poll so far, and once it is over, the whole poll
    /// (`settling` and `GET /admin/registry` read it).
    reachable: bool,
    /// Whether the last poll ended with the registry up, as logged: an outage is logged
    /// when it starts and when it ends, not at each failing poll.
    said_up: bool,
    /// The last poll's reads of the desired states failed: a start then settles from the
    /// cache (`startup`). A failed write alone (the report) is no reason to: what was read
    /// is being fetched from the registry.
    read_failed: bool,
    /// Why this poll's reads or writes failed, if they did.
    poll_error: Option<String>,
    /// The registry holds something this instance cannot read (a bad key under `models/`,
    /// unreadable reports under `instances/`): it goes on without it, and says so. Each is
    /// kept until the read that found it is made again (they flap otherwise).
    models_problem: Option<String>,
    fleet_problem: Option<String>,
    polls: u64,
}

impl Agent {
    pub(super) fn new(fleet: Fleet) -> Agent {
        let started_at_ms = now_ms();
        Agent {
            fleet,
            started_at_ms,
            boot: format!("{:016x}", fastrand::u64(..)),
            report_tag: None,
            duplicate: None,
            desired: BTreeMap::new(),
            listed: HashSet::new(),
            sha256: HashMap::new(),
            fetching: HashMap::new(),
            unavailable: HashMap::new(),
            sent: HashMap::new(),
            outcomes: HashMap::new(),
            parts: HashMap::new(),
            others: Vec::new(),
            others_fresh: false,
            mine: InstanceReport::default(),
            reachable: true,
            said_up: true,
            read_failed: false,
            poll_error: None,
            models_problem: None,
            fleet_problem: None,
            polls: 0,
        }
    }

    fn me(&self) -> &str {
        &self.fleet.shared.options.instance_id
    }

    pub(super) async fn run(mut self) {
        let mut stop = self.fleet.shared.stop.subscribe();
        let mut tick = tokio::time::interval(self.fleet.shared.options.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Settling (see `startup`) asks nothing of the registry, so polls wait meanwhile.
            let settling = self.settling();
            let settle = tokio::select! {
                _ = tick.tick(), if !settling => false,
                _ = self.fleet.shared.wake.notified(), if !settling => false,
                _ = tokio::time::sleep(startup::SETTLE_STEP), if settling => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            if settle {
                self.settle().await;
            } else {
                self.poll().await;
            }
        }
    }

    async fn poll(&mut self) {
        self.polls += 1;
        self.poll_error = None;
        self.others_fresh = false;
        let now = now_ms();
        let reachable = if self.polls == 1 {
            self.first_read().await
        } else {
            self.read_desired().await
        };
        self.read_failed = !reachable;
        self.fetch_needed(now, reachable).await;
        let rolling_out = self.desired.values().any(|(d, _)| d.rollout.is_some());
        if reachable && (rolling_out || self.polls % 10 == 1) {
            self.read_others(now).await;
        }
        self.route_all(now).await;
        let catalog = self.fleet.shared.catalog.snapshot();
        self.judge_parts(&catalog, now);
        self.mine = self.report(&catalog, now);
        if reachable {
            self.write_report(now).await;
        }
        if reachable && rolling_out && self.others_fresh {
            self.decide_all(now).await;
        }
        self.end_poll();
        self.publish_status(now);
        if !*self.fleet.shared.synced.borrow() && self.settled() {
            let _ = self.fleet.shared.synced.send(true);
        }
    }

    /// A read or write of this poll failed. Said (logged, counted) once the poll is over, by
    /// [`Agent::end_poll`].
    fn unreachable(&mut self, e: RegistryError) {
        self.reachable = false;
        self.poll_error = Some(e.to_string());
    }

    /// This poll's reads answered (a later write of the same poll may still fail).
    fn reached(&mut self) {
        self.reachable = true;
    }

    /// Whether the registry answered the whole poll: its reads, and the writes that followed
    /// them (the report, a rollout's decision). A store that answers reads but refuses this
    /// instance's writes (read-only credentials) is not up: the fleet does not see this
    /// instance. An outage is logged once when it starts and once when it ends, however many
    /// polls fail meanwhile, and `streamserve_registry_up` says the same.
    fn end_poll(&mut self) {
        let up = self.poll_error.is_none();
        self.reachable = up;
        metrics::gauge!("streamserve_registry_up").set(if up { 1.0 } else { 0.0 });
        let outcome = if up { "ok" } else { "error" };
        metrics::counter!("streamserve_registry_polls_total", "outcome" => outcome).increment(1);
        match (&self.poll_error, self.said_up) {
            (Some(error), true) => {
                tracing::warn!(%error, "registry unreachable; serving what this instance has")
            }
            (None, false) => tracing::info!("registry reachable again"),
            _ => {}
        }
        self.said_up = up;
    }

    /// Sets one of the registry's content problems, logging it when it changes.
    fn problem(slot: &mut Option<String>, now: Option<String>) {
        if *slot != now {
            match &now {
                Some(problem) => {
                    tracing::warn!(%problem, "the registry holds what this instance cannot read; going on without it")
                }
                None if slot.is_some() => {
                    tracing::info!("the registry's unreadable entries are gone")
                }
                None => {}
            }
        }
        *slot = now;
    }

    /// What went wrong with the registry, as reported: this poll's error, then what it holds
    /// that cannot be read.
    fn registry_error(&self) -> Option<String> {
        let all: Vec<&str> = [&self.poll_error, &self.models_problem, &self.fleet_problem]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        (!all.is_empty()).then(|| all.join("; "))
    }

    /// The models to read when a bad key fails the listing of `models/`: the ones known
    /// already (read before, kept in the cache, or that the other instances serve).
    fn known_models(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = self.desired.keys().cloned().collect();
        names.extend(
            self.fleet
                .shared
                .cache
                .load_desired()
                .into_iter()
                .map(|d| d.model),
        );
        names.extend(self.others.iter().flat_map(|r| r.models.keys().cloned()));
        names
            .into_iter()
            .filter(|n| crate::registry::check_name("model name", n).is_ok())
            .collect()
    }

    /// Reads every model's desired state (only changed documents travel); on the first poll
    /// with the registry unreachable, takes what the cache kept. Returns whether the registry
    /// answered.
    async fn read_desired(&mut self) -> bool {
        let store = self.fleet.shared.store.clone();
        let names = match store.list_dirs(crate::registry::MODELS_DIR).await {
            Ok(names) => {
                Self::problem(&mut self.models_problem, None);
                names
            }
            // The store answered, but holds a key that is no path: the known models are still
            // read (a new model is found once the key is gone).
            Err(RegistryError::Corrupt(reason)) => {
                Self::problem(&mut self.models_problem, Some(reason));
                self.known_models()
            }
            Err(e) => {
                if self.polls == 1 {
                    self.start_from_cache();
                }
                self.unreachable(e);
                return false;
            }
        };
        for name in names {
            let known = self.desired.get(&name).and_then(|(_, etag)| etag.clone());
            match store
                .read_json::<Desired>(&desired_key(&name), known.as_ref())
                .await
            {
                Ok(Read::Unchanged) => {}
                Ok(Read::Missing) => {
                    self.desired.remove(&name);
                }
                Ok(Read::Found(found)) if found.value.model != name => {
                    tracing::error!(model = %name, "desired state names another model; ignored");
                }
                Ok(Read::Found(found)) if found.value.format > FORMAT => {
                    tracing::error!(model = %name, format = found.value.format, "desired state in a newer format; ignored (upgrade streamserve)");
                }
                Ok(Read::Found(found)) => {
                    if let Err(e) = self.fleet.shared.cache.save_desired(&found.value) {
                        tracing::warn!(error = %e, "cannot keep the desired state in the cache");
                    }
                    self.desired.insert(name, (found.value, Some(found.tag)));
                }
                Err(RegistryError::Corrupt(reason)) => {
                    tracing::error!(model = %name, %reason, "desired state unreadable; keeping the last one");
                }
                Err(e) => {
                    self.unreachable(e);
                    return false;
                }
            }
        }
        self.reached();
        true
    }

    /// Starts fetching each version a desired state names that is not listed yet; collects
    /// the fetches that finished. While the registry does not answer (`reachable` false),
    /// takes versions from the cache alone, at once: a fetch would first wait for the
    /// registry to fail again, and only then fall back to the same cache.
    async fn fetch_needed(&mut self, now: u64, reachable: bool) {
        let finished: Vec<Key> = self
            .fetching
            .iter()
            .filter(|(_, task)| task.is_finished())
            .map(|(key, _)| key.clone())
            .collect();
        for key in finished {
            let task = self.fetching.remove(&key).expect("listed above");
            // The record is kept before the file is fetched (even when the file then fails).
            if let Some(record) = self.fleet.shared.cache.load_record(&key.0, &key.1) {
                self.sha256.insert(key.clone(), record.sha256);
            }
            let result = task
                .now_or_never()
                .map(|joined| joined.unwrap_or_else(|e| Err(RegistryError::Local(e.to_string()))));
            match result {
                Some(Ok(())) => {
                    metrics::counter!("streamserve_registry_fetches_total", "outcome" => "ok")
                        .increment(1);
                    self.unavailable.remove(&key);
                    self.listed.insert(key);
                }
                Some(Err(e)) => {
                    metrics::counter!("streamserve_registry_fetches_total", "outcome" => "failed")
                        .increment(1);
                    tracing::error!(model = %key.0, version = %key.1, error = %e, "cannot take the version from the registry");
                    self.unavailable.insert(key, (e, now));
                }
                None => {}
            }
        }
        let needed: Vec<Key> = self
            .desired
            .values()
            .flat_map(|(d, _)| {
                let rollout = d
                    .rollout
                    .iter()
                    .flat_map(|r| [Some(&r.version), r.from.as_ref()]);
                [d.default.as_ref()]
                    .into_iter()
                    .chain(rollout)
                    .flatten()
                    .map(|v| (d.model.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for key in needed {
            let retry_later = self.unavailable.get(&key).is_some_and(|(e, at)| {
                let wait = match e {
                    RegistryError::Corrupt(_) => CORRUPT_RETRY_MS,
                    _ => FETCH_RETRY_MS,
                };
                now.saturating_sub(*at) < wait
            });
            if self.listed.contains(&key) || self.fetching.contains_key(&key) || retry_later {
                continue;
            }
            if !reachable {
                self.take_from_cache(&key).await;
                continue;
            }
            let fleet = self.fleet.clone();
            let (name, version) = key.clone();
            let task = actix_web::rt::spawn(async move {
                let fetched = fleet.fetch(&name, &version).await;
                fleet.shared.wake.notify_one();
                fetched
            });
            self.fetching.insert(key, task);
        }
    }

    /// Reads the other instances' reports, keeping the live ones; takes long-dead ones out.
    /// Unreadable reports are left out (and reported); a read that fails as a whole leaves
    /// `others_fresh` false, so that no decision is made from the last view.
    async fn read_others(&mut self, now: u64) {
        let store = self.fleet.shared.store.clone();
        match crate::registry::ops::instances(&store).await {
            Ok(all) => {
                let me = self.me().to_string();
                let (live, dead): (Vec<_>, Vec<_>) = all
                    .reports
                    .into_iter()
                    .partition(|r| fleet::is_live(r, now));
                for report in dead {
                    // `ops::instances` keeps only reports whose id is their file's name:
                    // this is the key the report was listed under.
                    if now.saturating_sub(report.heartbeat_at_ms) > STALE_REPORT_MS {
                        let _ = store.delete(&instance_key(&report.id)).await;
                    }
                }
                self.others = live.into_iter().filter(|r| r.id != me).collect();
                self.others_fresh = true;
                let skipped = (!all.skipped.is_empty()).then(|| all.skipped.join("; "));
                Self::problem(&mut self.fleet_problem, skipped);
                metrics::gauge!("streamserve_fleet_instances_live")
                    .set((self.others.len() + 1) as f64);
            }
            Err(RegistryError::Corrupt(reason)) => {
                Self::problem(&mut self.fleet_problem, Some(reason))
            }
            Err(e) => self.unreachable(e),
        }
    }

    /// The live instances, this one with its last report (none before its first poll).
    fn live(&self) -> Vec<InstanceReport> {
        let mut live = self.others.clone();
        if !self.mine.id.is_empty() {
            live.push(self.mine.clone());
        }
        live
    }

    /// Routes every model with a desired state: sends the supervisor its plan when it changed
    /// or when the last one had not settled.
    async fn route_all(&mut self, now: u64) {
        let live = self.live();
        let me = self.me().to_string();
        let models: Vec<(String, Desired)> = self
            .desired
            .iter()
            .map(|(n, (d, _))| (n.clone(), d.clone()))
            .collect();
        for (name, desired) in models {
            let plan = fleet::plan(&desired, &me, now, &live);
            let sha256 = plan
                .versions()
                .into_iter()
                .filter_map(|v| {
                    let sha = self.sha256.get(&(name.clone(), v.clone()))?;
                    Some((v, sha.clone()))
                })
                .collect();
            let route = Route {
                sha256,
                name: name.clone(),
                default: plan.default.clone(),
                canary: plan.canary.map(|c| Canary {
                    version: c.version,
                    percent: c.percent,
                }),
                prepare: plan.prepare,
                smoke_test: plan.smoke_test,
            };
            let unchanged = self
                .sent
                .get(&name)
                .is_some_and(|(sent, settled)| *sent == route && *settled);
            if unchanged {
                continue;
            }
            let Some(outcome) = self.fleet.send_route(route.clone()).await else {
                return;
            };
            let settled = outcome
                .versions
                .values()
                .all(|r| matches!(r, Readiness::Ready | Readiness::Failed(_)));
            self.sent.insert(name.clone(), (route, settled));
            self.outcomes.insert(name, outcome);
        }
    }

    /// Whether every model's routing settled (for the first sync).
    fn settled(&self) -> bool {
        self.desired.keys().all(|name| {
            self.sent.get(name).is_some_and(|(_, settled)| *settled)
                || self.desired[name]
                    .0
                    .default
                    .as_ref()
                    .is_some_and(|v| self.unavailable.contains_key(&(name.clone(), v.clone())))
        }) && self.fetching.is_empty()
    }
}
