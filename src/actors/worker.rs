//! `ModelWorker`: one replica of one model version. It owns one ONNX Runtime session on its
//! device and runs on its own OS thread, because inference blocks; it takes whole batches
//! from its router over a bounded channel, packs them into one tensor per input (one copy),
//! runs the session, splits the outputs back per request (one copy) and answers each request
//! directly. It then tells its router it is idle again, with what the batch cost.
//!
//! A panic inside inference is caught and reported: the worker stops, and its router retries
//! the batch once elsewhere (or answers it with 503) while the supervisor's policy starts a
//! fresh worker. Replies are shared slots, so whoever answers first (a worker that finally
//! returns from a hang, or the router giving up on it) is the only one who answers.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::faults::{Fault, FaultQueue};
use crate::error::ServeError;
use crate::manifest::{BatchAxis, Device, ModelEntry};
use crate::model::{InferRequest, InferResponse};
use crate::runtime::{ModelSession, TensorSpec};
use crate::tensor::{NamedTensor, TensorData};

type ReplySender = oneshot::Sender<Result<InferResponse, ServeError>>;

/// Where a request's one answer goes. Clones share the slot: the first `send` delivers, later
/// ones are ignored, so a request is answered exactly once however its batch ends.
#[derive(Clone)]
pub struct Reply(Arc<Mutex<Option<ReplySender>>>);

impl Reply {
    pub fn new(sender: ReplySender) -> Reply {
        Reply(Arc::new(Mutex::new(Some(sender))))
    }

    /// Delivers the answer unless one was already given; returns whether this one was.
    pub fn send(&self, answer: Result<InferResponse, ServeError>) -> bool {
        let sender = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        sender.is_some_and(|s| s.send(answer).is_ok())
    }

    /// Answered already, or nobody is waiting any more (the client went away).
    pub fn is_closed(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|s| s.is_closed())
    }
}

/// A request waiting in a router's queue or riding in a batch.
#[derive(Clone)]
pub struct Pending {
    pub request: Arc<InferRequest>,
    pub reply: Reply,
    pub enqueued: Instant,
    /// After this the request is answered 504 instead of being run.
    pub deadline: Option<Instant>,
    /// Times this request was in a batch whose worker died.
    pub attempts: u8,
    /// Set when a primary model handed this request to its fallback: the model and version
    /// the client asked for, which its metrics are labelled with wherever it ends.
    pub degraded_from: Option<Arc<(String, String)>>,
}

/// Where each input's and output's batch axis is, for stacking requests into one call.
#[derive(Debug)]
pub struct BatchLayout {
    pub inputs: Vec<BatchAxis>,
    pub outputs: Vec<BatchAxis>,
}

/// What a router hands a worker: requests that can share one model call.
pub struct Batch {
    pub items: Vec<Pending>,
    /// How to stack the requests; `None` for a model without a batch axis (one request, run
    /// as sent).
    pub layout: Option<Arc<BatchLayout>>,
    /// The model and version that serve this batch, for the answers.
    pub served_by: Arc<(String, String)>,
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
    /// The worker panicked and has stopped, without answering its batch.
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
    faults: FaultQueue,
) -> oneshot::Receiver<Result<StartedWorker, String>> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread_name = format!("worker-{}-{}-{}", entry.name, entry.version, replica);
    let spawned = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            crate::telemetry::mark_supervised_thread();
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
                model = %entry.name, version = %entry.version, replica, generation, device = %session.device,
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
            run_loop(&mut session, rx, replica, generation, reports, faults);
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
    faults: FaultQueue,
) {
    // Ends when the router drops its handle (model unloaded, worker replaced, server stopping).
    while let Ok(batch) = batches.recv() {
        let started = Instant::now();
        let rows: usize = batch.items.iter().map(|p| p.request.rows).sum();
        let fault = faults.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            match fault {
                Some(Fault::Panic) => panic!("injected fault: panic"),
                Some(Fault::Hang { ms }) | Some(Fault::Slow { ms }) => {
                    std::thread::sleep(Duration::from_millis(ms))
                }
                None => {}
            }
            run_batch(session, &batch, rows)
        }));
        let compute = started.elapsed();
        let requests = batch.items.len();
        let degraded = |p: &Pending| p.degraded_from.is_some();
        let outcome = match outcome {
            Ok(Ok(per_request)) => {
                for (pending, outputs) in batch.items.iter().zip(per_request) {
                    pending.reply.send(Ok(InferResponse {
                        outputs,
                        batch_size: rows,
                        queue_time: started.saturating_duration_since(pending.enqueued),
                        compute_time: compute,
                        served_by: batch.served_by.clone(),
                        degraded: degraded(pending),
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
                for pending in &batch.items {
                    pending
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
                // The router holds this batch too and decides: retry elsewhere, or 503.
                let reason = crate::telemetry::panic_text(&*panic);
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
    let layout = match &batch.layout {
        Some(layout) if batch.items.len() > 1 => layout,
        // One request: run on its own buffers, nothing to pack or split.
        _ => {
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
    };

    let row_counts: Vec<usize> = batch.items.iter().map(|p| p.request.rows).collect();
    let packed: Vec<Option<(Vec<i64>, TensorData)>> = layout
        .inputs
        .iter()
        .enumerate()
        .map(|(i, axis)| match *axis {
            BatchAxis::Axis(k) => {
                let parts: Vec<&NamedTensor> =
                    batch.items.iter().map(|p| &p.request.inputs[i]).collect();
                Some(stack(&parts, &row_counts, k, rows))
            }
            // Validated identical across the batch: the first request's copy serves all.
            BatchAxis::Shared => None,
        })
        .collect();
    let inputs: Vec<(&[i64], &TensorData)> = packed
        .iter()
        .zip(&first.inputs)
        .map(|(packed, own)| match packed {
            Some((shape, data)) => (shape.as_slice(), data),
            None => (own.shape.as_slice(), &own.data),
        })
        .collect();
    let outputs = session.run(&inputs)?;

    for (output, axis) in outputs.iter().zip(&layout.outputs) {
        if let BatchAxis::Axis(k) = *axis {
            if output.shape.get(k).copied() != Some(rows as i64) {
                return Err(format!(
                    "output '{}' has shape {:?}, which does not keep the batch of {rows} rows on axis {k}",
                    output.name, output.shape
                ));
            }
        }
    }
    let mut offset = 0usize;
    let per_request = batch
        .items
        .iter()
        .map(|pending| {
            let request = &pending.request;
            let selected = request
                .outputs
                .iter()
                .map(|&i| match layout.outputs[i] {
                    BatchAxis::Axis(k) => unstack(&outputs[i], k, rows, offset, request.rows),
                    BatchAxis::Shared => outputs[i].clone(),
                })
                .collect();
            offset += request.rows;
            selected
        })
        .collect();
    Ok(per_request)
}

/// Concatenates tensors along `axis` (each holding `row_counts[j]` rows there) into one
/// tensor with `rows` rows: one copy of every element.
fn stack(
    parts: &[&NamedTensor],
    row_counts: &[usize],
    axis: usize,
    rows: usize,
) -> (Vec<i64>, TensorData) {
    let mut shape = parts[0].shape.clone();
    shape[axis] = rows as i64;
    let outer: usize = shape[..axis].iter().map(|&d| d as usize).product();
    let inner: usize = shape[axis + 1..].iter().map(|&d| d as usize).product();
    let mut data = TensorData::with_capacity(parts[0].data.datatype(), outer * rows * inner);
    for o in 0..outer {
        for (part, &n) in parts.iter().zip(row_counts) {
            let block = n * inner;
            data.extend_from_range(&part.data, o * block..(o + 1) * block);
        }
    }
    (shape, data)
}

/// The `count` rows from `offset` along `axis` of a batched output.
fn unstack(
    output: &NamedTensor,
    axis: usize,
    rows: usize,
    offset: usize,
    count: usize,
) -> NamedTensor {
    let outer: usize = output.shape[..axis].iter().map(|&d| d as usize).product();
    let inner: usize = output.shape[axis + 1..]
        .iter()
        .map(|&d| d as usize)
        .product();
    let mut data = TensorData::with_capacity(output.data.datatype(), outer * count * inner);
    for o in 0..outer {
        let start = (o * rows + offset) * inner;
        data.extend_from_range(&output.data, start..start + count * inner);
    }
    let mut shape = output.shape.clone();
    shape[axis] = count as i64;
    NamedTensor {
        name: output.name.clone(),
        shape,
        data,
    }
}

fn placeholder() -> NamedTensor {
    NamedTensor {
        name: String::new(),
        shape: Vec::new(),
        data: TensorData::Bool(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: Vec<i64>, data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: "t".into(),
            shape,
            data: TensorData::Fp32(data),
        }
    }

    #[test]
    fn stacking_along_axis_1_round_trips() {
        // Two requests with state [2, rows, 2]: 1 row and 2 rows.
        let a = tensor(vec![2, 1, 2], vec![1., 2., 3., 4.]);
        let b = tensor(vec![2, 2, 2], vec![5., 6., 7., 8., 9., 10., 11., 12.]);
        let (shape, data) = stack(&[&a, &b], &[1, 2], 1, 3);
        assert_eq!(shape, vec![2, 3, 2]);
        assert_eq!(
            data,
            TensorData::Fp32(vec![1., 2., 5., 6., 7., 8., 3., 4., 9., 10., 11., 12.])
        );
        let packed = NamedTensor {
            name: "t".into(),
            shape,
            data,
        };
        assert_eq!(unstack(&packed, 1, 3, 0, 1), a);
        assert_eq!(unstack(&packed, 1, 3, 1, 2), b);
    }

    #[test]
    fn stacking_along_axis_0_is_concatenation() {
        let a = tensor(vec![1, 2], vec![1., 2.]);
        let b = tensor(vec![2, 2], vec![3., 4., 5., 6.]);
        let (shape, data) = stack(&[&a, &b], &[1, 2], 0, 3);
        assert_eq!(shape, vec![3, 2]);
        assert_eq!(data, TensorData::Fp32(vec![1., 2., 3., 4., 5., 6.]));
        let packed = NamedTensor {
            name: "t".into(),
            shape,
            data,
        };
        assert_eq!(unstack(&packed, 0, 3, 1, 2), b);
    }
}
