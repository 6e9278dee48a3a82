//! `ModelWorker`: one replica of one model version. It owns one model session on its device
//! (ONNX Runtime's, or a test double: [`crate::runtime::InferenceSession`]) and runs on its own
//! OS thread, because inference blocks; it takes whole batches
//! from its router over a bounded channel, packs them into one tensor per input (one copy),
//! runs the session, splits the outputs back per request (one copy) and answers each request
//! directly. It then tells its router it is idle again, with what the batch cost: a call into
//! the router's state on this thread ([`ReportTarget`]), which may hand it its next batch at
//! once, so a busy worker goes from batch to batch without waking another thread.
//!
//! A model call that fails for a batch of several requests is retried request by request, so
//! that one request the model cannot take does not fail its batch mates. A request that still
//! fails alone is the request's doing when ONNX Runtime says `INVALID_ARGUMENT` (a kernel
//! refused its shapes or values) or when a batch mate ran fine alone: it is answered 400 with a
//! one-line reason and does not count as an inference failure. Anything else is a 500 and
//! counts (`streamserve_inference_failures_total`).
//!
//! A panic inside inference is caught and reported: the worker stops, and its router retries
//! the batch once elsewhere (or answers it with 503) while the supervisor's policy starts a
//! fresh worker ([`restart`]). Replies are shared slots, so whoever answers first (a worker that
//! finally returns from a hang, or the router giving up on it) is the only one who answers.

mod packing;
pub mod restart;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::faults::{Fault, FaultQueue};
use super::pending::Batch;
use crate::error::ServeError;
use crate::manifest::{BatchAxis, Device, ModelEntry};
use crate::model::{InferRequest, InferResponse};
use crate::monitor::OnceWatch;
use crate::runtime::{InferenceSession, RunError, Sessions, TensorSpec};
use crate::tensor::{NamedTensor, TensorData};
use packing::{placeholder, stack, unstack};

/// What a worker tells its router after each batch.
#[derive(Debug)]
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

/// The router, as its workers see it: it takes a report on the worker's own thread and answers
/// whether it still runs (a worker whose router is gone stops).
pub trait ReportTarget: Send + Sync {
    fn report(&self, report: WorkerReport) -> bool;
}

/// Where the workers of one version report. The recipe, and so the first workers, exist
/// before their router does; the router connects itself when it starts. A worker only reports
/// after its router dispatched it a batch, so by then the target is always there. Weak: the
/// router's state owns the workers' channels, not the other way round.
#[derive(Clone, Default)]
pub struct Reports(Arc<OnceLock<Weak<dyn ReportTarget>>>);

impl Reports {
    /// Sends every report of these workers to `target` (once; later calls are ignored).
    pub fn connect(&self, target: Weak<dyn ReportTarget>) {
        let _ = self.0.set(target);
    }

    /// Hands a report to the router; `false` when there is no router any more.
    fn send(&self, report: WorkerReport) -> bool {
        let target = self.0.get().and_then(Weak::upgrade);
        target.is_some_and(|router| router.report(report))
    }
}

/// The router's end of a live worker.
pub struct WorkerHandle {
    pub replica: usize,
    pub generation: u64,
    pub device: Device,
    batches: flume::Sender<Batch>,
}

impl WorkerHandle {
    /// Where to hand this worker its batch, kept apart from the handle so that the router can
    /// send after releasing its lock.
    pub fn inbox(&self) -> Inbox {
        Inbox(self.batches.clone())
    }
}

/// A worker's batch channel.
pub struct Inbox(flume::Sender<Batch>);

impl Inbox {
    /// Hands the worker a batch without waiting; gives it back if the worker thread is gone,
    /// or still holds a batch (a worker given up on as hung, whose slot was refilled).
    pub fn submit(&self, batch: Batch) -> Result<(), Batch> {
        self.0.try_send(batch).map_err(|e| e.into_inner())
    }
}

/// A worker whose session loaded, with the interface the model declares.
pub struct StartedWorker {
    pub handle: WorkerHandle,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// What every worker of one model version starts from: the version, how to load its session,
/// and where to report. Each replica's worker adds its index, generation and fault book.
#[derive(Clone)]
pub struct WorkerRecipe {
    pub entry: Arc<ModelEntry>,
    pub sessions: Sessions,
    pub reports: Reports,
    /// The version's model monitor, which records every model call.
    pub watch: Arc<OnceWatch>,
}

impl WorkerRecipe {
    /// Starts a worker thread that loads the model; resolves once the session is ready (or
    /// failed to load, with the reason).
    pub fn spawn(
        &self,
        replica: usize,
        generation: u64,
        faults: FaultQueue,
    ) -> oneshot::Receiver<Result<StartedWorker, String>> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let WorkerRecipe {
            entry,
            sessions,
            reports,
            watch,
        } = self.clone();
        let thread_name = format!("worker-{}-{}-{}", entry.name, entry.version, replica);
        let spawned = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                crate::telemetry::mark_supervised_thread();
                let started = Instant::now();
                let mut session = match sessions.load(&entry) {
                    Ok(session) => session,
                    Err(reason) => {
                        let _ = ready_tx.send(Err(reason));
                        return;
                    }
                };
                let device = session.device();
                tracing::info!(
                    model = %entry.name, version = %entry.version, replica, generation, device = %device,
                    load_ms = started.elapsed().as_millis() as u64, "worker ready"
                );
                // Capacity 1: the router only dispatches to idle workers, so a batch never
                // waits here.
                let (tx, rx) = flume::bounded::<Batch>(1);
                let started = StartedWorker {
                    handle: WorkerHandle {
                        replica,
                        generation,
                        device,
                        batches: tx,
                    },
                    inputs: session.inputs().to_vec(),
                    outputs: session.outputs().to_vec(),
                };
                if ready_tx.send(Ok(started)).is_err() {
                    return;
                }
                let worker = Worker {
                    replica,
                    generation,
                    reports,
                    faults,
                    watch,
                };
                run_loop(&mut *session, rx, worker);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot spawn a worker thread: {e}");
        }
        ready_rx
    }
}

/// What one worker thread keeps beside its session.
struct Worker {
    replica: usize,
    generation: u64,
    reports: Reports,
    faults: FaultQueue,
    watch: Arc<OnceWatch>,
}

fn run_loop(session: &mut dyn InferenceSession, batches: flume::Receiver<Batch>, worker: Worker) {
    let Worker {
        replica,
        generation,
        reports,
        faults,
        watch,
    } = worker;
    let watch = &*watch;
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
            run_each(session, &batch, rows, watch)
        }));
        let compute = started.elapsed();
        let requests = batch.items.len();
        let outcome = match outcome {
            Ok((results, alone)) => {
                let failed = answer(&batch, results, alone, rows, started, compute);
                BatchOutcome::Done {
                    rows,
                    requests,
                    compute,
                    failed,
                }
            }
            Err(panic) => {
                // The router holds this batch too and decides: retry elsewhere, or 503.
                let reason = crate::telemetry::panic_text(&*panic);
                reports.send(WorkerReport {
                    replica,
                    generation,
                    outcome: BatchOutcome::Died { reason },
                });
                return;
            }
        };
        let report = WorkerReport {
            replica,
            generation,
            outcome,
        };
        if !reports.send(report) {
            return;
        }
    }
}

type Outputs = Vec<NamedTensor>;

/// Runs the batch in one model call; when that fails for several requests, runs each alone
/// (one bad request must not fail its batch mates). Returns each request's outcome, and
/// whether they ran alone.
fn run_each(
    session: &mut dyn InferenceSession,
    batch: &Batch,
    rows: usize,
    watch: &OnceWatch,
) -> (Vec<Result<Outputs, RunError>>, bool) {
    match run_batch(session, batch, rows, watch) {
        Ok(per_request) => (per_request.into_iter().map(Ok).collect(), false),
        Err(e) if batch.items.len() == 1 => (vec![Err(e)], true),
        Err(e) => {
            tracing::debug!(error = %e.message, requests = batch.items.len(), "batch failed; running its requests one by one");
            let alone = batch
                .items
                .iter()
                .map(|p| run_alone(session, &p.request, watch))
                .collect();
            (alone, true)
        }
    }
}

/// Answers every request of a batch; returns whether a failure was the model's (not a
/// request's), which counts against the replica.
fn answer(
    batch: &Batch,
    results: Vec<Result<Outputs, RunError>>,
    alone: bool,
    rows: usize,
    started: Instant,
    compute: Duration,
) -> bool {
    // A request that fails alone while another ran fine alone is the one at fault.
    let model_works = alone && results.iter().any(Result::is_ok);
    let mut failed = false;
    for (pending, result) in batch.items.iter().zip(results) {
        let reply = match result {
            Ok(outputs) => Ok(InferResponse {
                outputs,
                batch_size: if alone { pending.request.rows } else { rows },
                queue_time: started.saturating_duration_since(pending.enqueued),
                compute_time: compute,
                served_by: batch.served_by.clone(),
                degraded: pending.degraded_from.is_some(),
            }),
            Err(e) if e.invalid_input || model_works => {
                tracing::debug!(model = %batch.served_by.0, error = %e.message, "the model refused a request's input");
                Err(ServeError::invalid(format!(
                    "model '{}' cannot run this input: {}",
                    batch.served_by.0,
                    e.reason()
                )))
            }
            Err(e) => {
                tracing::warn!(model = %batch.served_by.0, error = %e.message, "inference failed");
                failed = true;
                Err(ServeError::Inference(e.reason()))
            }
        };
        pending.reply.send(reply);
    }
    failed
}

/// Runs one request on its own buffers: nothing to pack or split.
fn run_alone(
    session: &mut dyn InferenceSession,
    request: &InferRequest,
    watch: &OnceWatch,
) -> Result<Outputs, RunError> {
    let inputs: Vec<(&[i64], &TensorData)> = request
        .inputs
        .iter()
        .map(|t| (t.shape.as_slice(), &t.data))
        .collect();
    let mut outputs = session.run(&inputs)?;
    observe(watch, &inputs, &outputs, request.rows);
    Ok(request
        .outputs
        .iter()
        .map(|&i| std::mem::replace(&mut outputs[i], placeholder()))
        .collect())
}

/// Hands one model call to the version's monitor (once it has one).
fn observe(
    watch: &OnceWatch,
    inputs: &[(&[i64], &TensorData)],
    outputs: &[NamedTensor],
    rows: usize,
) {
    if let Some(watch) = watch.get() {
        let data: Vec<&TensorData> = inputs.iter().map(|(_, data)| *data).collect();
        watch.observe(&data, outputs, rows);
    }
}

/// Packs the batch, runs the model once, and splits each output back per request.
fn run_batch(
    session: &mut dyn InferenceSession,
    batch: &Batch,
    rows: usize,
    watch: &OnceWatch,
) -> Result<Vec<Outputs>, RunError> {
    let first = &batch.items[0].request;
    let layout = match &batch.layout {
        Some(layout) if batch.items.len() > 1 => layout,
        _ => return Ok(vec![run_alone(session, first, watch)?]),
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
    observe(watch, &inputs, &outputs, rows);

    for (output, axis) in outputs.iter().zip(&layout.outputs) {
        if let BatchAxis::Axis(k) = *axis {
            if output.shape.get(k).copied() != Some(rows as i64) {
                return Err(RunError {
                    message: format!(
                        "output '{}' has shape {:?}, which does not keep the batch of {rows} rows on axis {k}",
                        output.name, output.shape
                    ),
                    invalid_input: false,
                });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::pending::{Pending, Reply};

    /// A batch of `n` one-row requests, with the receivers of their answers.
    fn batch(
        n: usize,
    ) -> (
        Batch,
        Vec<oneshot::Receiver<Result<InferResponse, ServeError>>>,
    ) {
        let (items, answers) = (0..n)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                let pending = Pending {
                    request: Arc::new(InferRequest {
                        inputs: vec![],
                        rows: 1,
                        outputs: vec![],
                    }),
                    reply: Reply::new(tx),
                    enqueued: Instant::now(),
                    deadline: None,
                    attempts: 0,
                    degraded_from: None,
                    priority: crate::actors::router::Priority::Normal,
                };
                (pending, rx)
            })
            .unzip();
        let batch = Batch {
            items,
            layout: None,
            served_by: Arc::new(("m".into(), "1".into())),
        };
        (batch, answers)
    }

    fn run_error(invalid_input: bool) -> RunError {
        RunError {
            message: "Non-zero status code returned while running Conv node. Name:'c' Status Message: bad\nmore".into(),
            invalid_input,
        }
    }

    fn status(rx: &mut oneshot::Receiver<Result<InferResponse, ServeError>>) -> u16 {
        use actix_web::ResponseError;
        match rx.try_recv().unwrap() {
            Ok(_) => 200,
            Err(e) => e.status_code().as_u16(),
        }
    }

    #[test]
    fn failures_the_request_caused_are_400s_that_do_not_count() {
        let now = Instant::now();
        // INVALID_ARGUMENT: the input's doing, alone or not.
        let (b, mut rx) = batch(1);
        assert!(!answer(
            &b,
            vec![Err(run_error(true))],
            true,
            1,
            now,
            Duration::ZERO
        ));
        assert_eq!(status(&mut rx[0]), 400);
        // Any other error of a request that ran alone is the model's: 500, counted...
        let (b, mut rx) = batch(1);
        assert!(answer(
            &b,
            vec![Err(run_error(false))],
            true,
            1,
            now,
            Duration::ZERO
        ));
        assert_eq!(status(&mut rx[0]), 500);
        // ...unless a batch mate ran fine alone: then the model works and the request is at fault.
        let (b, mut rx) = batch(3);
        let results = vec![Ok(vec![]), Err(run_error(false)), Err(run_error(true))];
        assert!(!answer(&b, results, true, 3, now, Duration::ZERO));
        assert_eq!(
            rx.iter_mut().map(status).collect::<Vec<_>>(),
            vec![200, 400, 400]
        );
        // The message is one line: the node and its complaint.
        let (b, mut rx) = batch(1);
        answer(&b, vec![Err(run_error(true))], true, 1, now, Duration::ZERO);
        let message = rx[0].try_recv().unwrap().unwrap_err().to_string();
        assert_eq!(message, "model 'm' cannot run this input: Conv node: bad");
    }
}
