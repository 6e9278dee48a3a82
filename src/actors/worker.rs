//! `ModelWorker`: one replica of one model version. It owns one ONNX Runtime session on its
//! device and runs on its own OS thread, because inference blocks; it takes whole batches
//! from its router over a bounded channel, packs them into one tensor per input (one copy),
//! runs the session, splits the outputs back per request (one copy) and answers each request
//! directly. It then tells its router it is idle again, with what the batch cost.
//!
//! A panic inside inference is caught: the requests of that batch get an explicit error, and
//! the worker reports itself dead so that its supervisor can replace it with a fresh session.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::manifest::{Device, ModelEntry};
use crate::model::{InferRequest, InferResponse};
use crate::runtime::{ModelSession, TensorSpec};
use crate::tensor::{NamedTensor, TensorData};

pub type Reply = oneshot::Sender<Result<InferResponse, ServeError>>;

/// A request waiting in a router's queue or riding in a batch.
pub struct Pending {
    pub request: InferRequest,
    pub reply: Reply,
    pub enqueued: Instant,
}

/// What a router hands a worker: requests that can share one model call.
pub struct Batch {
    pub items: Vec<Pending>,
    /// Whether the requests are stacked along axis 0 (the model has a batch axis).
    pub stacked: bool,
}

/// What a worker tells its router after each batch.
#[derive(Debug, actix::Message)]
#[rtype(result = "()")]
pub struct WorkerReport {
    pub replica: usize,
    pub generation: u64,
    pub outcome: BatchOutcome,
}

#[derive(Debug)]
pub enum BatchOutcome {
    /// The batch ran (successfully or with an inference error each request was told about).
    Done {
        rows: usize,
        requests: usize,
        compute: Duration,
        failed: bool,
    },
    /// The worker panicked and has stopped; its requests were answered with an error.
    Died { reason: String },
}

/// The router's end of a live worker.
pub struct WorkerHandle {
    pub replica: usize,
    pub generation: u64,
    pub device: Device,
    batches: flume::Sender<Batch>,
}

impl WorkerHandle {
    /// Hands the worker a batch; gives it back if the worker thread is gone.
    pub fn submit(&self, batch: Batch) -> Result<(), Batch> {
        self.batches.send(batch).map_err(|e| e.into_inner())
    }
}

/// A worker whose session loaded, with the interface the model declares.
pub struct StartedWorker {
    pub handle: WorkerHandle,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Starts a worker thread that loads `entry`'s model; resolves once the session is ready (or
/// failed to load, with the reason).
pub fn spawn(
    entry: Arc<ModelEntry>,
    replica: usize,
    generation: u64,
    env: &'static ort::environment::Environment,
    reports: flume::Sender<WorkerReport>,
) -> oneshot::Receiver<Result<StartedWorker, String>> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread_name = format!("worker-{}-{}-{}", entry.name, entry.version, replica);
    let spawned = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let started = Instant::now();
            let mut session = match ModelSession::load(
                env,
                &entry.file,
                entry.device,
                entry.allow_cpu_fallback,
                entry.intra_threads,
            ) {
                Ok(session) => session,
                Err(reason) => {
                    let _ = ready_tx.send(Err(reason));
                    return;
                }
            };
            tracing::info!(
                model = %entry.name, version = %entry.version, replica, device = %session.device,
                load_ms = started.elapsed().as_millis() as u64, "worker ready"
            );
            // Capacity 1: the router only dispatches to idle workers, so a batch never waits here.
            let (tx, rx) = flume::bounded::<Batch>(1);
            let started = StartedWorker {
                handle: WorkerHandle {
                    replica,
                    generation,
                    device: session.device,
                    batches: tx,
                },
                inputs: session.inputs.clone(),
                outputs: session.outputs.clone(),
            };
            if ready_tx.send(Ok(started)).is_err() {
                return;
            }
            run_loop(&mut session, rx, replica, generation, reports);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot spawn a worker thread: {e}");
    }
    ready_rx
}

fn run_loop(
    session: &mut ModelSession,
    batches: flume::Receiver<Batch>,
    replica: usize,
    generation: u64,
    reports: flume::Sender<WorkerReport>,
) {
    // Ends when the router drops its handle (model unloaded or server stopping).
    while let Ok(batch) = batches.recv() {
        let started = Instant::now();
        let rows: usize = batch.items.iter().map(|p| p.request.rows).sum();
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| run_batch(session, &batch, rows)));
        let compute = started.elapsed();
        let requests = batch.items.len();
        let outcome = match outcome {
            Ok(Ok(per_request)) => {
                for (pending, outputs) in batch.items.into_iter().zip(per_request) {
                    let _ = pending.reply.send(Ok(InferResponse {
                        outputs,
                        batch_size: rows,
                        queue_time: started.saturating_duration_since(pending.enqueued),
                        compute_time: compute,
                    }));
                }
                BatchOutcome::Done {
                    rows,
                    requests,
                    compute,
                    failed: false,
                }
            }
            Ok(Err(message)) => {
                for pending in batch.items {
                    let _ = pending
                        .reply
                        .send(Err(ServeError::Inference(message.clone())));
                }
                BatchOutcome::Done {
                    rows,
                    requests,
                    compute,
                    failed: true,
                }
            }
            Err(panic) => {
                let reason = panic_message(&panic);
                for pending in batch.items {
                    let _ = pending.reply.send(Err(ServeError::WorkerLost(format!(
                        "worker panicked: {reason}"
                    ))));
                }
                let _ = reports.send(WorkerReport {
                    replica,
                    generation,
                    outcome: BatchOutcome::Died { reason },
                });
                return;
            }
        };
        if reports
            .send(WorkerReport {
                replica,
                generation,
                outcome,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Packs the batch, runs the model once, and splits each output back per request.
fn run_batch(
    session: &mut ModelSession,
    batch: &Batch,
    rows: usize,
) -> Result<Vec<Vec<NamedTensor>>, String> {
    let first = &batch.items[0].request;
    if !batch.stacked || batch.items.len() == 1 {
        // Nothing to pack: run on the request's own buffers.
        let inputs: Vec<(&[i64], &TensorData)> = first
            .inputs
            .iter()
            .map(|t| (t.shape.as_slice(), &t.data))
            .collect();
        let mut outputs = session.run(&inputs)?;
        let selected = first
            .outputs
            .iter()
            .map(|&i| std::mem::replace(&mut outputs[i], placeholder()))
            .collect();
        return Ok(vec![selected]);
    }

    let packed: Vec<(Vec<i64>, TensorData)> = (0..first.inputs.len())
        .map(|i| {
            let mut shape = first.inputs[i].shape.clone();
            shape[0] = rows as i64;
            let elements = batch
                .items
                .iter()
                .map(|p| p.request.inputs[i].data.len())
                .sum();
            let mut data = TensorData::with_capacity(first.inputs[i].data.datatype(), elements);
            for pending in &batch.items {
                data.extend_from(&pending.request.inputs[i].data);
            }
            (shape, data)
        })
        .collect();
    let inputs: Vec<(&[i64], &TensorData)> =
        packed.iter().map(|(s, d)| (s.as_slice(), d)).collect();
    let outputs = session.run(&inputs)?;

    for output in &outputs {
        if output.shape.first().copied() != Some(rows as i64) {
            return Err(format!(
                "output '{}' has shape {:?}, which does not keep the batch of {rows} rows on axis 0",
                output.name, output.shape
            ));
        }
    }
    let mut row = 0usize;
    let per_request = batch
        .items
        .iter()
        .map(|pending| {
            let request = &pending.request;
            let selected = request
                .outputs
                .iter()
                .map(|&i| {
                    let output = &outputs[i];
                    let per_row = output.data.len() / rows;
                    let mut shape = output.shape.clone();
                    shape[0] = request.rows as i64;
                    NamedTensor {
                        name: output.name.clone(),
                        shape,
                        data: output
                            .data
                            .slice(row * per_row..(row + request.rows) * per_row),
                    }
                })
                .collect();
            row += request.rows;
            selected
        })
        .collect();
    Ok(per_request)
}

fn placeholder() -> NamedTensor {
    NamedTensor {
        name: String::new(),
        shape: Vec::new(),
        data: TensorData::Bool(Vec::new()),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}
