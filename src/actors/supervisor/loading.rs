//! Loading one model version, and what a load needs to know: [`load_version`] reserves the
//! version's memory in the [`Budgets`] (a version that does not fit costs nothing more),
//! verifies the file, starts a worker per replica, checks the model's interface against the
//! manifest, takes the rest of its share of the budgets, and starts its router; [`smoke_test`]
//! proves a freshly loaded version answers before a deployment gives it traffic.
//!
//! These are plain functions of a manifest entry, not of the supervisor's state, so that the
//! supervisor only decides *when* to load (startup, first request, deployment) and what the
//! outcome means for the catalog. The rules a load checks ([`batch_axes`], the
//! [`estimate_resources`] it publishes) are pure and unit-tested here.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;

use crate::actors::budget::{replica_memory_mb, Budgets};
use crate::actors::catalog::{SharedCatalog, VersionState};
use crate::actors::faults::FaultQueue;
use crate::actors::health::ModelHealth;
use crate::actors::router::{self, FallbackLookup, RouterSetup};
use crate::actors::served::{InferOptions, ServedModel};
use crate::actors::worker::{Reports, WorkerHandle, WorkerRecipe};
use crate::error::ServeError;
use crate::manifest::{verify_sha256, BatchAxis, Device, ModelEntry};
use crate::model::{ModelInfo, Resources};
use crate::monitor::probe::{Probe, ProbeOutcome};
use crate::monitor::profile::Profile;
use crate::monitor::{ModelWatch, OnceWatch, WatchSettings};
use crate::runtime::{Sessions, TensorSpec};
use crate::stream::layout::{check_declaration, declared_models};
use crate::stream::pipeline::Layout;

/// How a refusal for lack of memory starts: such a version stays loadable later.
pub(super) const DOES_NOT_FIT: &str = "does not fit";

/// Loads one model version: reserves its memory, verifies its sha256, starts a worker per
/// replica (each loads its own session), checks the interface against the manifest, and starts
/// its router on an arbiter of its own. A version that cannot be served comes back `Unavailable` with the reason.
pub async fn load_version(
    entry: Arc<ModelEntry>,
    sessions: Sessions,
    catalog: Arc<SharedCatalog>,
    budgets: Arc<Budgets>,
    watch: WatchSettings,
) -> VersionState {
    match serve(&entry, sessions, catalog, budgets, watch).await {
        Ok(served) => VersionState::Serving(served),
        Err(reason) => {
            tracing::error!(model = %entry.name, version = %entry.version, %reason, "model refused");
            VersionState::Unavailable { entry, reason }
        }
    }
}

/// [`load_version`]'s steps, in order; the first that fails says why the version is refused.
async fn serve(
    entry: &Arc<ModelEntry>,
    sessions: Sessions,
    catalog: Arc<SharedCatalog>,
    budgets: Arc<Budgets>,
    watch_settings: WatchSettings,
) -> Result<ServedModel, String> {
    let started = Instant::now();
    // The memory budget is there so that loading cannot exhaust the machine: a version that
    // does not fit is refused before its replicas load, not after. And before its file is
    // hashed: such a version stays loadable, so each request for it tries again, and a
    // refusal must not cost a read of the whole file (seconds, for a large model, on the
    // supervisor's thread) every time.
    let file_bytes = std::fs::metadata(&entry.file).map_or(0, |m| m.len());
    let reserved = Reserved::take(&budgets, entry.device, file_bytes, entry.replicas)?;
    verify_sha256(entry)?;
    // Both are read before any worker starts: a broken profile or probe refuses the version,
    // so that a typo cannot silently turn a check off.
    let profile = Profile::load_beside(&entry.file, &entry.sha256)?;
    let probe = Probe::load_beside(&entry.file)?;
    let watch = Arc::new(OnceWatch::default());
    let recipe = WorkerRecipe {
        entry: entry.clone(),
        sessions,
        reports: Reports::default(),
        watch: watch.clone(),
    };
    let faults: Vec<FaultQueue> = (0..entry.replicas).map(|_| FaultQueue::default()).collect();
    let (workers, inputs, outputs) = start_workers(&recipe, &faults).await?;
    let device = workers[0].device;
    let info = Arc::new(model_info(entry, inputs, outputs, device)?);
    check_stream_models(&info, &catalog)?;
    let names = |specs: &[TensorSpec]| specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let mut model_watch = ModelWatch::new(
        (&entry.name, &entry.version, &entry.sha256),
        (&names(&info.inputs), &names(&info.outputs)),
        watch_settings,
        profile,
        probe,
    );
    if info.stream.is_some() {
        model_watch = model_watch.with_stream_stats();
    }
    let model_watch = Arc::new(model_watch);
    watch.set(model_watch.clone());
    // Ready as soon as this returns: the router only starts (and publishes) on its own thread.
    let health = Arc::new(ModelHealth::new(workers.len(), entry.replicas));
    take_budgets(entry, &info, &budgets, reserved)?;
    // A fallback whose model cannot take this one's requests is never used (said once in the
    // log): degrading to it would fail every request it took, just when load is high.
    let fallback: FallbackLookup = {
        let (info, warned) = (info.clone(), std::sync::atomic::AtomicBool::new(false));
        Arc::new(
            move |name| match catalog.snapshot().ready_fallback(name, &info) {
                Ok(fallback) => fallback.map(|fallback| fallback.router),
                Err(why) => {
                    if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::error!(model = %info.name, version = %info.version, "{why}; it is not used");
                    }
                    None
                }
            },
        )
    };
    let router = router::start(RouterSetup {
        info: info.clone(),
        recipe,
        budgets,
        fallback,
        workers,
        faults,
        health: health.clone(),
    });
    tracing::info!(
        model = %entry.name, version = %entry.version, device = %device, replicas = entry.replicas,
        max_batch_size = entry.batching.max_batch_size, start_ms = started.elapsed().as_millis() as u64,
        "model serving"
    );
    Ok(ServedModel {
        watch: model_watch,
        series: Default::default(),
        hold: Default::default(),
        info,
        router,
        health,
    })
}

/// Starts a worker per replica and waits for their sessions. Serving needs one: replicas that
/// failed are logged (their router restarts them); if none loaded, the first reason is the
/// version's. Returns the workers and the interface the model declares.
async fn start_workers(
    recipe: &WorkerRecipe,
    faults: &[FaultQueue],
) -> Result<(Vec<WorkerHandle>, Vec<TensorSpec>, Vec<TensorSpec>), String> {
    let entry = &recipe.entry;
    let loading = faults
        .iter()
        .enumerate()
        .map(|(replica, faults)| recipe.spawn(replica, 0, faults.clone()));
    let mut workers: Vec<WorkerHandle> = Vec::new();
    let mut interface = None;
    let mut failures = Vec::new();
    for result in join_all(loading).await {
        match result {
            Ok(Ok(started)) => {
                interface.get_or_insert((started.inputs, started.outputs));
                workers.push(started.handle);
            }
            Ok(Err(reason)) => failures.push(reason),
            Err(_) => failures.push("worker thread ended while loading".to_string()),
        }
    }
    let Some((inputs, outputs)) = interface else {
        return Err(failures
            .first()
            .cloned()
            .unwrap_or_else(|| "no replica loaded".into()));
    };
    if !failures.is_empty() {
        tracing::warn!(model = %entry.name, version = %entry.version, failed = failures.len(), reason = %failures[0], "some replicas failed to load");
    }
    Ok((workers, inputs, outputs))
}

/// What the catalog says of a loaded version: its interface checked against the manifest
/// (batch axes, declared input rules, a stream kind's required interface) and its resources.
/// `streamserve profile` takes it too, to validate requests as the server does.
pub fn model_info(
    entry: &ModelEntry,
    mut inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    device: Device,
) -> Result<ModelInfo, String> {
    let (input_axes, output_axes) = batch_axes(entry, &inputs, &outputs)?;
    let input_rules = crate::rules::resolve(entry, &mut inputs, &input_axes)?;
    let file_bytes = std::fs::metadata(&entry.file).map(|m| m.len()).unwrap_or(0);
    let info = ModelInfo {
        name: entry.name.clone(),
        version: entry.version.clone(),
        inputs,
        input_rules,
        allow_non_finite: entry.allow_non_finite,
        outputs,
        batching: entry.batching,
        input_axes,
        output_axes,
        stream: entry.stream.clone(),
        device,
        replicas: entry.replicas,
        max_queue: entry.max_queue,
        fallback: entry.fallback.clone(),
        slo: entry.slo,
        sha256: entry.sha256.clone(),
        description: entry.description.clone(),
        source: entry.source.clone(),
        resources: estimate_resources(entry, file_bytes, device),
    };
    // A stream of this model alone is checked now, at every rate it takes; one with stages
    // before it, when a stream starts (its stages' models load on their own).
    if let Some(decl) = info.stream.as_ref().filter(|d| d.stages.is_empty()) {
        for &rate in &decl.sample_rates {
            Layout::resolve(decl, &[&info], rate).map_err(|reason| format!("stream: {reason}"))?;
        }
    }
    Ok(info)
}

/// A stream declared with stages or a gate, checked against its models' default versions as
/// a stream's `start` would resolve it, so that a declaration that does not fit its models
/// refuses the declaring version with the reason, not every stream with a 1008. The supervisor
/// loads such versions after the others (`Start`); a model the declaration names that is not
/// serving (lazy, or failed) leaves the check to each `start`.
fn check_stream_models(info: &ModelInfo, catalog: &SharedCatalog) -> Result<(), String> {
    let Some(decl) = &info.stream else {
        return Ok(());
    };
    let names = declared_models(decl);
    if names.is_empty() {
        return Ok(()); // `model_info` checked a stream of this model alone
    }
    let catalog = catalog.snapshot();
    let mut served = Vec::with_capacity(names.len());
    for name in &names {
        match catalog.resolve(name, None) {
            Ok(model) => served.push(model),
            Err(e) => {
                tracing::info!(model = %info.name, version = %info.version, stage = %name, reason = %e,
                    "a model the stream declaration names is not serving: the declaration is checked when a stream starts");
                return Ok(());
            }
        }
    }
    let infos: Vec<&ModelInfo> = served.iter().map(|m| &*m.info).collect();
    check_declaration(decl, info, &infos).map_err(|reason| format!("stream: {reason}"))
}

/// What a version's replicas are estimated to use, as the catalog publishes it: their threads,
/// and twice the model file per replica (weights plus working memory) in RAM or, on a GPU, VRAM.
pub(super) fn estimate_resources(entry: &ModelEntry, file_bytes: u64, device: Device) -> Resources {
    let estimate = (file_bytes * 2 * entry.replicas as u64).div_ceil(1 << 20);
    let on_gpu = matches!(device, Device::Cuda(_));
    Resources {
        cpu_threads: entry.replicas * entry.intra_threads,
        ram_mb: if on_gpu { 0 } else { estimate },
        vram_mb: if on_gpu { estimate } else { 0 },
        model_file_bytes: file_bytes,
    }
}

/// Memory taken from the budget for a version's replicas before they load; given back unless
/// the version is served.
struct Reserved<'a> {
    budgets: &'a Budgets,
    device: Device,
    mb: u64,
}

impl<'a> Reserved<'a> {
    /// Every replica's memory on the manifest's device, or the version is refused as one that
    /// [`DOES_NOT_FIT`].
    fn take(
        budgets: &'a Budgets,
        device: Device,
        file_bytes: u64,
        replicas: usize,
    ) -> Result<Reserved<'a>, String> {
        let mb = replica_memory_mb(file_bytes) * replicas as u64;
        budgets
            .memory
            .try_take(device, mb)
            .map_err(|reason| format!("{DOES_NOT_FIT}: {reason}"))?;
        Ok(Reserved {
            budgets,
            device,
            mb,
        })
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.budgets.memory.give_back(self.device, self.mb);
    }
}

/// Keeps every replica's memory on the replicas' device (a device other than the manifest's is
/// taken anew, refusing the version when it does not fit there) and takes their threads (which
/// may go over the CPU budget: it then only stops scaling up, everywhere). Every replica's, not
/// only those that loaded: the router starts the others again, and gives back every replica's
/// share when the version unloads.
fn take_budgets(
    entry: &ModelEntry,
    info: &ModelInfo,
    budgets: &Budgets,
    mut reserved: Reserved<'_>,
) -> Result<(), String> {
    let memory_mb = replica_memory_mb(info.resources.model_file_bytes) * entry.replicas as u64;
    if reserved.device == info.device && memory_mb <= reserved.mb {
        // Kept: the part that is not needed goes back now, the rest stays taken.
        budgets
            .memory
            .give_back(reserved.device, reserved.mb - memory_mb);
        reserved.mb = 0;
    } else {
        drop(reserved);
        if let Err(reason) = budgets.memory.try_take(info.device, memory_mb) {
            return Err(format!("{DOES_NOT_FIT}: {reason}"));
        }
    }
    let threads = entry.replicas * entry.intra_threads;
    if !budgets.cpu.take(threads) {
        tracing::info!(model = %entry.name, version = %entry.version, threads, budget = budgets.cpu.total,
            "replicas now use more threads than the CPU budget; no model can scale up until some are released");
    }
    Ok(())
}

/// Resolves each tensor's batch axis (0 unless the manifest's `batch_axes` says otherwise) and
/// checks that the model can really be stacked that way.
pub(super) fn batch_axes(
    entry: &ModelEntry,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<(Vec<BatchAxis>, Vec<BatchAxis>), String> {
    let batched = entry.batching.max_batch_size > 0;
    for name in entry.batch_axes.keys() {
        if !inputs.iter().chain(outputs).any(|s| &s.name == name) {
            return Err(format!(
                "batch_axes names '{name}', which is neither an input nor an output"
            ));
        }
    }
    let resolve = |specs: &[TensorSpec]| -> Result<Vec<BatchAxis>, String> {
        specs
            .iter()
            .map(|spec| {
                let axis = entry.batch_axes.get(&spec.name).copied().unwrap_or(BatchAxis::Axis(0));
                if let (true, BatchAxis::Axis(k)) = (batched, axis) {
                    if spec.shape.get(k).copied() != Some(-1) {
                        return Err(format!(
                            "max_batch_size is {} but '{}' has shape {:?}, without a dynamic axis {k} to batch on; \
                             name its batch axis in batch_axes, or set max_batch_size = 0",
                            entry.batching.max_batch_size, spec.name, spec.shape
                        ));
                    }
                }
                Ok(axis)
            })
            .collect()
    };
    let input_axes = resolve(inputs)?;
    let output_axes = resolve(outputs)?;
    if batched && !input_axes.iter().any(|a| matches!(a, BatchAxis::Axis(_))) {
        return Err(
            "max_batch_size is set but every input is shared; no input carries the batch".into(),
        );
    }
    Ok((input_axes, output_axes))
}

/// One request of zeros (dynamic dimensions 1; declared shapes and values where the manifest
/// declares them) through a freshly loaded version.
/// Proves a version answers before a deployment gives it traffic: its probe when it has one
/// (the golden input must give the expected answer), otherwise an example input of the right
/// shapes.
pub(super) async fn smoke_test(served: &ServedModel) -> Result<(), ServeError> {
    if served.watch.probe().is_some() {
        let outcome = run_probe(served).await;
        served.watch.record_probe(outcome.clone());
        return match outcome {
            ProbeOutcome::Passed => Ok(()),
            ProbeOutcome::Failed(e) => Err(ServeError::invalid(format!(
                "the version's probe fails: {e}"
            ))),
            // Before a deployment the version must be checked, not skipped.
            ProbeOutcome::Inconclusive(e) => Err(ServeError::invalid(format!(
                "the version's probe could not be checked: {e}"
            ))),
        };
    }
    let info = &served.info;
    let request = info.validate(info.example_inputs(), None)?;
    served.infer(request, InferOptions::now()).await?;
    Ok(())
}

/// How long a probe waits for its answer before it counts as failed.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends the version's probe through its router and judges the answer.
pub async fn run_probe(served: &ServedModel) -> ProbeOutcome {
    let Some(probe) = served.watch.probe() else {
        return ProbeOutcome::Passed;
    };
    let request = match probe.inputs().and_then(|inputs| {
        served
            .info
            .validate(inputs, Some(probe.output_names()))
            .map_err(|e| format!("the golden input does not fit the model: {e}"))
    }) {
        Ok(request) => request,
        Err(e) => return ProbeOutcome::Failed(e),
    };
    let options = InferOptions::now().with_timeout(Some(PROBE_TIMEOUT));
    match served.infer(request, options).await {
        // The fallback answered: the version itself was not probed.
        Ok(answer) if answer.degraded => {
            ProbeOutcome::Inconclusive("answered by the fallback, not this version".into())
        }
        Ok(answer) => match probe.judge(&answer.outputs) {
            Ok(()) => ProbeOutcome::Passed,
            Err(e) => ProbeOutcome::Failed(e),
        },
        Err(
            e @ (ServeError::Overloaded { .. }
            | ServeError::DeadlineExceeded { .. }
            | ServeError::ShuttingDown),
        ) => ProbeOutcome::Inconclusive(e.to_string()),
        Err(e) => ProbeOutcome::Failed(format!("no answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifest::Manifest;
    use crate::tensor::DataType;

    /// One manifest entry `m:1`, with `extra` manifest keys.
    fn entry(extra: &str) -> ModelEntry {
        let text = format!(
            "[[models]]\nname = \"m\"\nversion = \"1\"\nfile = \"m.onnx\"\nsha256 = \"{}\"\n{extra}\n",
            "0".repeat(64)
        );
        Manifest::parse(Path::new("/models"), &text)
            .expect("a valid manifest")
            .models
            .remove(0)
    }

    fn spec(name: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn batch_axes_default_to_0_and_need_a_dynamic_dimension_there_when_batching() {
        let (x, y) = ([spec("x", &[-1, 4])], [spec("y", &[-1, 4])]);
        let batched = entry("max_batch_size = 8");
        assert_eq!(
            batch_axes(&batched, &x, &y),
            Ok((vec![BatchAxis::Axis(0)], vec![BatchAxis::Axis(0)]))
        );
        let fixed = [spec("x", &[2, 4])];
        let err = batch_axes(&batched, &fixed, &y).unwrap_err();
        assert!(err.contains("without a dynamic axis 0"), "{err}");
        // Without batching any shape will do: every request runs alone.
        assert!(batch_axes(&entry(""), &fixed, &y).is_ok());
    }

    #[test]
    fn batch_axes_from_the_manifest_are_checked_against_the_model() {
        let (x, y) = ([spec("x", &[-1, 4])], [spec("y", &[-1, 4])]);
        let with_state = [spec("x", &[-1, 4]), spec("state", &[2, -1, 8])];
        let rnn = entry("max_batch_size = 8\nbatch_axes = { state = 1 }");
        assert_eq!(
            batch_axes(&rnn, &with_state, &y),
            Ok((
                vec![BatchAxis::Axis(0), BatchAxis::Axis(1)],
                vec![BatchAxis::Axis(0)]
            ))
        );
        let unknown = entry("batch_axes = { z = 0 }");
        let err = batch_axes(&unknown, &x, &y).unwrap_err();
        assert!(
            err.contains("'z', which is neither an input nor an output"),
            "{err}"
        );
        let all_shared = entry("max_batch_size = 8\nbatch_axes = { x = \"shared\" }");
        let err = batch_axes(&all_shared, &x, &y).unwrap_err();
        assert!(err.contains("every input is shared"), "{err}");
    }

    /// A version that does not fit is refused before its file is read: it stays loadable, so
    /// every request for it loads it again, and hashing a large file each time would cost
    /// seconds of the supervisor's thread. Here the hash is wrong too, and goes unread.
    #[actix_web::test]
    async fn a_version_that_does_not_fit_is_refused_before_its_file_is_hashed() {
        let dir = std::env::temp_dir().join(format!("streamserve-fit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.onnx"), b"not the file the manifest hashed").unwrap();
        let text = format!(
            "[[models]]\nname = \"m\"\nversion = \"1\"\nfile = \"m.onnx\"\nsha256 = \"{}\"\n",
            "0".repeat(64)
        );
        let entry = Manifest::parse(&dir, &text).unwrap().models.remove(0);
        let loader =
            crate::runtime::doubles::DoubleLoader::new(crate::runtime::doubles::Behaviour::Echo)
                .leak();
        let budgets = Arc::new(Budgets::new(4, 0, 0));
        let state = load_version(
            Arc::new(entry),
            loader,
            Arc::new(SharedCatalog::default()),
            budgets,
            WatchSettings::default(),
        )
        .await;
        let VersionState::Unavailable { reason, .. } = state else {
            panic!("expected a refusal");
        };
        assert!(reason.starts_with(DOES_NOT_FIT), "{reason}");
    }

    #[test]
    fn resources_are_twice_the_file_per_replica_on_its_device() {
        let two = entry("replicas = 2\nintra_threads = 3");
        let cpu = estimate_resources(&two, 3 << 20, Device::Cpu);
        assert_eq!(
            (
                cpu.cpu_threads,
                cpu.ram_mb,
                cpu.vram_mb,
                cpu.model_file_bytes
            ),
            (6, 12, 0, 3 << 20)
        );
        let gpu = estimate_resources(&two, 3 << 20, Device::Cuda(0));
        assert_eq!((gpu.ram_mb, gpu.vram_mb), (0, 12));
        // Rounded up to whole MiB: a tiny model is not free.
        assert_eq!(estimate_resources(&entry(""), 10, Device::Cpu).ram_mb, 1);
    }
}
