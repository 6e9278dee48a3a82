//! The supervisor: starts every model version of the manifest (verifying its sha256, loading a
//! worker per replica, starting its router on an arbiter of its own), publishes the result to
//! the [`Registry`], and owns the restart policy for workers that die.
//!
//! A model that cannot be served (hash mismatch, file missing, GPU unusable) is refused with a
//! clear log line and listed as unavailable; every other model keeps serving.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::join_all;

use super::registry::{Catalog, Registry, ServedModel, VersionState};
use super::router::{ModelHealth, Router};
use super::worker::{self, FaultQueue, WorkerHandle, WorkerReport};
use crate::manifest::{verify_sha256, BatchAxis, Manifest, ModelEntry, StreamKind};
use crate::model::ModelInfo;
use crate::runtime::TensorSpec;
use crate::stream::vad::VadInterface;

pub struct Supervisor {
    env: &'static ort::environment::Environment,
    registry: Arc<Registry>,
}

impl Supervisor {
    pub fn new(env: &'static ort::environment::Environment, registry: Arc<Registry>) -> Supervisor {
        Supervisor { env, registry }
    }

    /// Starts every model of the manifest concurrently and publishes the catalog.
    pub async fn start_manifest(&self, manifest: &Manifest) {
        let started = join_all(
            manifest
                .models
                .iter()
                .cloned()
                .map(|entry| self.start_model(Arc::new(entry))),
        )
        .await;
        let mut catalog = Catalog::default();
        for (entry, state) in manifest.models.iter().zip(started) {
            catalog
                .models
                .entry(entry.name.clone())
                .or_default()
                .versions
                .insert(entry.version.clone(), state);
        }
        self.registry.publish(catalog);
    }

    async fn start_model(&self, entry: Arc<ModelEntry>) -> VersionState {
        let started = Instant::now();
        let refuse = |reason: String| {
            tracing::error!(model = %entry.name, version = %entry.version, %reason, "model refused");
            VersionState::Unavailable {
                entry: entry.clone(),
                reason,
            }
        };
        if let Err(reason) = verify_sha256(&entry) {
            return refuse(reason);
        }
        let (reports_tx, reports_rx) = flume::unbounded::<WorkerReport>();
        let faults: Vec<FaultQueue> = (0..entry.replicas).map(|_| FaultQueue::default()).collect();
        let loading = (0..entry.replicas).map(|replica| {
            worker::spawn(
                entry.clone(),
                replica,
                0,
                self.env,
                reports_tx.clone(),
                faults[replica].clone(),
            )
        });
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
            return refuse(
                failures
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "no replica loaded".into()),
            );
        };
        if !failures.is_empty() {
            tracing::warn!(model = %entry.name, version = %entry.version, failed = failures.len(), reason = %failures[0], "some replicas failed to load");
        }
        let (input_axes, output_axes) = match batch_axes(&entry, &inputs, &outputs) {
            Ok(axes) => axes,
            Err(reason) => return refuse(reason),
        };
        let device = workers[0].device;
        let info = Arc::new(ModelInfo {
            name: entry.name.clone(),
            version: entry.version.clone(),
            inputs,
            outputs,
            batching: entry.batching,
            input_axes,
            output_axes,
            stream: entry.stream,
            device,
            replicas: entry.replicas,
            max_queue: entry.max_queue,
            fallback: entry.fallback.clone(),
            sha256: entry.sha256.clone(),
            description: entry.description.clone(),
            source: entry.source.clone(),
        });
        if info.stream == Some(StreamKind::Vad) {
            if let Err(reason) = VadInterface::resolve(&info) {
                return refuse(format!("stream = \"vad\", but {reason}"));
            }
        }
        let health = Arc::new(ModelHealth {
            // Ready as soon as this returns: the router only starts (and publishes) on its own thread.
            healthy_replicas: AtomicUsize::new(workers.len()),
            replicas: entry.replicas,
        });
        let arbiter = Arbiter::new();
        let router = {
            let (info, entry, health, env, registry) = (
                info.clone(),
                entry.clone(),
                health.clone(),
                self.env,
                self.registry.clone(),
            );
            Router::start_in_arbiter(&arbiter.handle(), move |ctx| {
                ctx.add_stream(reports_rx.into_stream());
                Router::new(
                    info, entry, env, registry, workers, faults, reports_tx, health,
                )
            })
        };
        tracing::info!(
            model = %entry.name, version = %entry.version, device = %device, replicas = entry.replicas,
            max_batch_size = entry.batching.max_batch_size, start_ms = started.elapsed().as_millis() as u64,
            "model serving"
        );
        VersionState::Serving(ServedModel {
            info,
            router,
            health,
        })
    }
}

/// Resolves each tensor's batch axis (0 unless the manifest's `batch_axes` says otherwise) and
/// checks that the model can really be stacked that way.
fn batch_axes(
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

/// How long to wait before restarting a worker that has died `recent` times in the last
/// minute: at once the first time (a one-off crash costs no capacity for longer than a model
/// load), then 100 ms doubling to 5 s, so a worker that crashes on every batch cannot spin.
pub fn restart_delay(recent: usize) -> Duration {
    match recent {
        0 | 1 => Duration::ZERO,
        n => (Duration::from_millis(100) * 2u32.saturating_pow(n as u32 - 2))
            .min(Duration::from_secs(5)),
    }
}

/// Starts a replacement worker after `delay`, retrying with exponential backoff (100 ms
/// doubling to 5 s) until a session loads; resolves to the new worker's handle.
pub async fn restart_worker(
    entry: Arc<ModelEntry>,
    replica: usize,
    generation: u64,
    env: &'static ort::environment::Environment,
    reports: flume::Sender<WorkerReport>,
    faults: FaultQueue,
    delay: Duration,
) -> WorkerHandle {
    actix_web::rt::time::sleep(delay).await;
    let mut backoff = Duration::from_millis(100);
    loop {
        match worker::spawn(
            entry.clone(),
            replica,
            generation,
            env,
            reports.clone(),
            faults.clone(),
        )
        .await
        {
            Ok(Ok(started)) => return started.handle,
            Ok(Err(reason)) => {
                tracing::error!(model = %entry.name, version = %entry.version, replica, %reason, "worker restart failed")
            }
            Err(_) => {
                tracing::error!(model = %entry.name, replica, "worker thread ended while loading")
            }
        }
        actix_web::rt::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
