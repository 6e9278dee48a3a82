//! Batch prediction jobs (docs/jobs.md): a JSON Lines file of KServe v2 requests run through
//! the model's own router on the low-priority lane, its answers written in input order to
//! `<output>.part` in fsynced chunks and renamed to `<output>` when complete.
//!
//! [`Jobs`] is the registry and the one owner of every job's state: the API submits, lists
//! and cancels through it; each running job is one task (`run.rs`) on the jobs' own runtime
//! (a thread of its own, so that file I/O never stalls the HTTP workers or the actors), which
//! reports its checkpoints back here. Every change of state is written to
//! `<jobs_dir>/<id>.json` (`store.rs`) under the registry's lock, so the state file and the
//! table never disagree; at start, jobs still running in their files resume from their last
//! checkpoint, exactly once.

mod lookup;
mod npy;
mod record;
mod remote;
mod retention;
mod run;
mod stage;
mod store;
mod submit;
mod view;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Addr;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::actors::catalog::SharedCatalog;
use crate::actors::supervisor::Supervisor;
use crate::error::ServeError;

pub use lookup::Lookup;
pub use record::{
    Checkpoint, JobRecord, JobSpec, JobState, OnError, RowError, Source, KEPT_ERRORS,
    MAX_LINE_BYTES,
};
pub use retention::Retention;
pub use submit::Submission;
use view::view;

/// What a running job's task is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Run,
    /// The server is stopping: end without touching the job's state (it resumes at the next
    /// start).
    Stop,
    /// Cancelled: the registry has already recorded it.
    Cancel,
}

struct Entry {
    record: JobRecord,
    signal: watch::Sender<Signal>,
    /// When this process started running it, and its rows done then (for the rate).
    started: Option<(Instant, u64)>,
    /// Its output is complete and being renamed (and indexed, to publish): too late to
    /// cancel.
    finishing: bool,
}

struct Inner {
    dir: PathBuf,
    catalog: Arc<SharedCatalog>,
    supervisor: Addr<Supervisor>,
    table: Mutex<BTreeMap<String, Entry>>,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    close: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// The published predictions of each model (`lookup.rs`).
    published: lookup::Tables,
    /// Outputs of submissions being checked, not yet in `table`: a second submission of the
    /// same output meanwhile is refused (the checks of an object take a while).
    claimed: Mutex<std::collections::HashSet<String>>,
    /// How long, and how many, finished jobs are kept (`retention.rs`).
    retention: Retention,
}

/// The jobs of this server (cheap to clone: one shared registry).
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

/// How long the shutdown waits for running jobs to stop.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The nice value of the jobs' threads: reading, decoding and writing rows yields the CPU to
/// the HTTP workers and the model's workers whenever they want it.
const JOB_NICE: i32 = 10;

fn lower_priority() {
    if let Err(e) = crate::telemetry::lower_cpu_priority(JOB_NICE) {
        tracing::debug!(error = %e, "cannot lower the priority of a job thread");
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Jobs {
    /// The registry on `dir`, its runtime started, the finished jobs past `retention`
    /// removed, and every unfinished job in `dir` resumed. The directory is made at the first
    /// submission, not here.
    pub fn start(
        dir: &Path,
        retention: Retention,
        catalog: Arc<SharedCatalog>,
        supervisor: Addr<Supervisor>,
    ) -> anyhow::Result<Jobs> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("streamserve-jobs".into())
            .spawn(move || {
                lower_priority();
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("streamserve-job")
                    .on_thread_start(lower_priority)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = closed.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        let runtime = handle_rx.recv()??;
        let dir = std::path::absolute(dir)?;
        let jobs = Jobs {
            inner: Arc::new(Inner {
                catalog,
                supervisor,
                table: Mutex::new(BTreeMap::new()),
                runtime,
                tasks: Mutex::new(Vec::new()),
                close: Mutex::new(Some(close)),
                published: lookup::Tables::load(&dir),
                claimed: Mutex::default(),
                retention,
                dir,
            }),
        };
        let records = store::load_all(&jobs.inner.dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the jobs directory {}: {e}",
                jobs.inner.dir.display()
            )
        })?;
        let mut resume = Vec::new();
        for record in records {
            if !record.state.finished() {
                if record.spec.publish {
                    jobs.inner.published.expect_refresh(&record.spec.model);
                }
                resume.push(record.id.clone());
            }
            jobs.insert(record);
        }
        // Before any job runs: what is staged for an unfinished job is its own.
        jobs.remove_leftovers();
        for id in resume {
            tracing::info!(job = %id, "resuming batch job");
            jobs.spawn(&id);
        }
        jobs.prune_finished();
        jobs.sweep_periodically();
        Ok(jobs)
    }

    fn insert(&self, record: JobRecord) {
        let (signal, _) = watch::channel(Signal::Run);
        self.table().insert(
            record.id.clone(),
            Entry {
                record,
                signal,
                started: None,
                finishing: false,
            },
        );
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self, id: &str) {
        let Some(signal) = self.table().get(id).map(|e| e.signal.subscribe()) else {
            return;
        };
        let (jobs, id) = (self.clone(), id.to_string());
        // A task that panics ends without a word: caught, the job fails saying so instead of
        // showing `running` forever (and running into the same panic at every start).
        let task = self.inner.runtime.spawn(async move {
            let run = std::panic::AssertUnwindSafe(run::run(jobs.clone(), id.clone(), signal));
            if let Err(panic) = futures_util::FutureExt::catch_unwind(run).await {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                jobs.fail(&id, format!("the job stopped on an internal error: {why}"));
            }
        });
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Checks a submission (model, input, output) and starts the job: 202's record. Reads the
    /// whole input to count its rows: call it off the HTTP threads.
    pub fn submit(&self, submission: Submission) -> Result<Value, ServeError> {
        // The output stays claimed until the job is in the table (`_claim` dropped at the end).
        let (record, _claim) = submit::check(self, submission)?;
        let id = record.id.clone();
        if let Err(e) = store::save(&self.inner.dir, &record) {
            let _ = std::fs::remove_file(record.spec.part_path());
            tracing::error!(job = %id, error = %e, "cannot save the job");
            return Err(ServeError::Storage(format!("cannot save the job: {e}")));
        }
        tracing::info!(job = %id, model = %record.spec.model, input = %record.spec.input_name(), output = %record.spec.output_name(), rows = record.rows_total, "batch job submitted");
        if record.spec.publish {
            self.inner.published.expect_refresh(&record.spec.model);
        }
        self.insert(record);
        self.spawn(&id);
        self.get(&id)
    }

    /// Claims `output` (a path or a URI, as [`JobSpec::output_name`] writes it) for a
    /// submission: `None` when an unfinished job writes it or another submission has claimed
    /// it. Checked and claimed under the table's lock, so two submissions of one output at
    /// once cannot both pass.
    fn claim_output(&self, output: String) -> Option<OutputClaim> {
        let table = self.table();
        let in_use = table
            .values()
            .any(|e| !e.record.state.finished() && e.record.spec.output_name() == output);
        let mut claimed = self.inner.claimed.lock().unwrap_or_else(|e| e.into_inner());
        if in_use || !claimed.insert(output.clone()) {
            return None;
        }
        Some(OutputClaim {
            jobs: self.clone(),
            output,
        })
    }

    /// Runs `future` on the jobs' runtime and waits for it: for the object-store checks of a
    /// submission, which runs on a blocking thread.
    fn block_on<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().expect("the jobs' runtime runs")
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<Value> {
        let table = self.table();
        let mut entries: Vec<&Entry> = table.values().collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.record.created_unix_ms));
        entries.into_iter().map(view).collect()
    }

    pub fn get(&self, id: &str) -> Result<Value, ServeError> {
        self.table()
            .get(id)
            .map(view)
            .ok_or_else(|| ServeError::JobNotFound(id.to_string()))
    }

    /// Cancels a queued or running job: its task stops, its `.part` file is removed.
    pub fn cancel(&self, id: &str) -> Result<Value, ServeError> {
        let mut table = self.table();
        let entry = table
            .get_mut(id)
            .ok_or_else(|| ServeError::JobNotFound(id.to_string()))?;
        let state = entry.record.state;
        if state.finished() {
            return Err(ServeError::Conflict(format!(
                "job '{id}' has already {}",
                state.name()
            )));
        }
        if entry.finishing {
            return Err(ServeError::Conflict(format!(
                "job '{id}' is finishing: every row is written"
            )));
        }
        entry.record.state = JobState::Cancelled;
        entry.record.finished_unix_ms = Some(now_ms());
        let _ = entry.signal.send(Signal::Cancel);
        entry.record.spec.discard_files(false);
        if let Err(e) = store::save(&self.inner.dir, &entry.record) {
            tracing::warn!(job = %id, error = %e, "cannot save the cancelled job's state");
        }
        tracing::info!(job = %id, "batch job cancelled");
        let cancelled = view(entry);
        drop(table);
        self.prune_finished();
        Ok(cancelled)
    }

    /// Stops every running job where it is (they resume at the next start) and ends the
    /// jobs' runtime.
    pub async fn shutdown(&self) {
        for entry in self.table().values() {
            let _ = entry.signal.send(Signal::Stop);
        }
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::time::timeout(STOP_WAIT, futures_util::future::join_all(tasks)).await;
        if let Some(close) = self
            .inner
            .close
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = close.send(());
        }
    }

    /// The published prediction of `model` for `key`.
    pub fn prediction(&self, model: &str, key: &str) -> Lookup {
        self.inner.published.lookup(model, key)
    }

    /// What `model`'s published predictions are (`None`: it has none).
    pub fn predictions_info(&self, model: &str) -> Option<Value> {
        self.inner.published.info(model)
    }

    /// Jobs per state, every state named (0 where none is in it).
    fn state_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts: BTreeMap<&'static str, u64> =
            JobState::ALL.iter().map(|s| (s.name(), 0)).collect();
        for entry in self.table().values() {
            *counts.entry(entry.record.state.name()).or_default() += 1;
        }
        counts
    }

    /// What the status page shows (no paths): jobs per state, the unfinished ones' progress,
    /// and each model's published predictions.
    pub fn summary(&self) -> Value {
        let states: BTreeMap<&str, u64> = self
            .state_counts()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        let mut active = Vec::new();
        for entry in self.table().values() {
            if !entry.record.state.finished() {
                let full = view(entry);
                active.push(json!({
                    "id": full["id"], "model": full["model"], "state": full["state"],
                    "rows_done": full["rows_done"], "rows_total": full["rows_total"],
                    "rows_per_sec": full["rows_per_sec"], "eta_secs": full["eta_secs"],
                    "errors": full["errors"], "publish": full["publish"],
                }));
            }
        }
        json!({
            "states": states,
            "active": active,
            "predictions": self.inner.published.all_info(),
        })
    }

    /// Sets the gauges read at a scrape: jobs per state, the age of each published table.
    pub fn record_metrics(&self) {
        for (state, n) in self.state_counts() {
            ::metrics::gauge!("streamserve_jobs", "state" => state).set(n as f64);
        }
        self.inner.published.record_ages();
    }

    // What the running task reports. Each returns false once the job is no longer running
    // (cancelled): the task then ends without writing.

    fn record(&self, id: &str) -> Option<JobRecord> {
        self.table().get(id).map(|e| e.record.clone())
    }

    fn started(&self, id: &str) -> bool {
        let mut table = self.table();
        let Some(entry) = table.get_mut(id) else {
            return false;
        };
        if entry.record.state.finished() {
            return false;
        }
        entry.started = Some((Instant::now(), entry.record.progress.rows_done));
        if entry.record.state == JobState::Queued {
            entry.record.state = JobState::Running;
            if let Err(e) = store::save(&self.inner.dir, &entry.record) {
                tracing::warn!(job = %id, error = %e, "cannot save the job's state");
            }
        }
        true
    }

    /// The input is staged with `rows` rows. False: the job is no longer running.
    fn staged(&self, id: &str, rows: u64) -> bool {
        let mut table = self.table();
        let Some(entry) = table.get_mut(id) else {
            return false;
        };
        if entry.record.state != JobState::Running {
            return false;
        }
        entry.record.staged = true;
        entry.record.rows_total = rows;
        if let Err(e) = store::save(&self.inner.dir, &entry.record) {
            tracing::warn!(job = %id, error = %e, "cannot save the job's state");
        }
        true
    }

    /// A chunk is fsynced in the `.part` file: this is now where the job resumes.
    fn checkpoint(&self, id: &str, progress: &Checkpoint) -> Result<bool, String> {
        let mut table = self.table();
        let Some(entry) = table.get_mut(id) else {
            return Ok(false);
        };
        if entry.record.state != JobState::Running {
            return Ok(false);
        }
        let rows = progress
            .rows_done
            .saturating_sub(entry.record.progress.rows_done);
        ::metrics::counter!("streamserve_job_rows_total", "model" => entry.record.spec.model.clone())
            .increment(rows);
        entry.record.progress = progress.clone();
        store::save(&self.inner.dir, &entry.record)
            .map_err(|e| format!("cannot save the checkpoint: {e}"))?;
        Ok(true)
    }

    /// Every row is written and checkpointed: the `.part` file becomes the output.
    fn succeed(&self, id: &str) {
        // The rename, and to publish, the read of the whole output, are done without the
        // registry's lock: the HTTP workers take it (every `/v2/jobs` call, `/metrics`,
        // `/status`), and indexing an output of millions of rows takes seconds. Meanwhile the
        // job is `finishing`, which a cancel is refused, so its state cannot change.
        let spec = {
            let mut table = self.table();
            let Some(entry) = table.get_mut(id) else {
                return;
            };
            if entry.record.state != JobState::Running {
                return;
            }
            entry.finishing = true;
            entry.record.spec.clone()
        };
        let part = spec.part_path();
        // A crash between the rename and the state file leaves the output and no `.part`.
        let renamed = if part.exists() || !spec.output.exists() {
            std::fs::rename(&part, &spec.output).and_then(|()| crate::files::sync_dir(&spec.output))
        } else {
            Ok(())
        };
        // Publishing indexes the output (a read of it) before the job is called succeeded: a
        // job asked to publish that cannot has failed, and the previous table stays.
        let not_published = |e: String| format!("the output is written but not published: {e}");
        let indexed = match renamed {
            Err(e) => Err(format!(
                "cannot rename {} to {}: {e}",
                part.display(),
                spec.output.display()
            )),
            Ok(()) if spec.publish => lookup::Tables::index(id, &spec.output)
                .map(Some)
                .map_err(not_published),
            Ok(()) => Ok(None),
        };
        let mut table = self.table();
        let Some(entry) = table.get_mut(id) else {
            return;
        };
        entry.finishing = false;
        let finished = indexed.and_then(|indexed| match indexed {
            Some(indexed) => {
                (self.inner.published.install(&spec.model, indexed)).map_err(not_published)
            }
            None => Ok(()),
        });
        spec.discard_files(finished.is_ok());
        match finished {
            Ok(()) => entry.record.state = JobState::Succeeded,
            Err(message) => {
                if spec.publish {
                    self.inner.published.refresh_failed(&spec.model, id);
                }
                entry.record.state = JobState::Failed;
                entry.record.message = Some(message);
            }
        }
        entry.record.finished_unix_ms = Some(now_ms());
        if let Err(e) = store::save(&self.inner.dir, &entry.record) {
            tracing::warn!(job = %id, error = %e, "cannot save the job's state");
        }
        tracing::info!(job = %id, state = ?entry.record.state, rows = entry.record.progress.rows_done, errors = entry.record.progress.errors, "batch job finished");
        drop(table);
        self.prune_finished();
    }

    fn fail(&self, id: &str, message: String) {
        let mut table = self.table();
        let Some(entry) = table.get_mut(id) else {
            return;
        };
        if entry.record.state.finished() {
            return;
        }
        tracing::warn!(job = %id, error = %message, "batch job failed");
        entry.record.spec.discard_files(false);
        if entry.record.spec.publish {
            self.inner
                .published
                .refresh_failed(&entry.record.spec.model, id);
        }
        entry.record.state = JobState::Failed;
        entry.record.message = Some(message);
        entry.record.finished_unix_ms = Some(now_ms());
        if let Err(e) = store::save(&self.inner.dir, &entry.record) {
            tracing::warn!(job = %id, error = %e, "cannot save the job's state");
        }
        drop(table);
        self.prune_finished();
    }
}

/// An output claimed by a submission being checked; released when dropped (the job is then
/// in the table, or was refused).
struct OutputClaim {
    jobs: Jobs,
    output: String,
}

impl Drop for OutputClaim {
    fn drop(&mut self) {
        let mut claimed = (self.jobs.inner.claimed.lock()).unwrap_or_else(|e| e.into_inner());
        claimed.remove(&self.output);
    }
}
