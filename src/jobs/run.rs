//! One running job: read the input from its checkpoint, send a bounded window of rows to the
//! model's router on the low-priority lane (so that the router batches them, behind online
//! traffic), write the answers in input order to the `.part` file, and checkpoint after each
//! fsynced chunk. A stop (server shutdown) or a cancel ends the loop between two rows; what
//! was written after the last checkpoint is cut off when the job resumes, so every row is in
//! the output exactly once.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::watch;

use super::{
    stage, Checkpoint, JobRecord, JobSpec, Jobs, OnError, RowError, Signal, KEPT_ERRORS,
    MAX_LINE_BYTES,
};
use crate::actors::catalog::ServedModel;
use crate::actors::served::{InferOptions, Priority};
use crate::actors::supervisor::EnsureLoaded;
use crate::error::ServeError;
use crate::model::InferResponse;
use crate::monitor::probe::TensorJson;
use crate::tensor::{DataType, TensorData};

/// Rows sent to the router and not yet written ...
const WINDOW: usize = 32;
/// ... and the bytes of their lines, which each keeps to send again: with no bound but the
/// rows, lines of up to [`MAX_LINE_BYTES`] (64 MiB) would hold 2 GiB, and their decoded
/// tensors as much again. A row more is read while the window is under this, so it holds at
/// most this plus one line, and always at least one row.
const WINDOW_BYTES: usize = 32 * 1024 * 1024;
/// A checkpoint after this many bytes of answers too, so that a model's large outputs do not
/// pile up in memory for [`CHUNK_ROWS`] rows.
const CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// A checkpoint after this many rows, or after [`CHUNK_TIME`], whichever comes first.
const CHUNK_ROWS: u64 = 256;
const CHUNK_TIME: Duration = Duration::from_secs(1);
/// A row that fails (a lost worker, an inference error) is sent again this many times,
/// backing off, before the job fails; one refused because the model is busy or loading waits
/// as long as it takes.
const RETRIES: u32 = 40;
/// How long a cold model may take to load.
const LOAD_WAIT: Duration = Duration::from_secs(60);

type Answer = Pin<Box<dyn Future<Output = Result<InferResponse, ServeError>> + Send>>;

/// A row read from the input.
struct Row {
    line: u64,
    /// Input bytes consumed up to the end of this row's line.
    end: u64,
    text: String,
    key: Value,
    /// Sent (its answer to come), or why it cannot be.
    sent: Result<Answer, String>,
}

enum Outcome {
    Done,
    Stopped,
}

pub(super) async fn run(jobs: Jobs, id: String, signal: watch::Receiver<Signal>) {
    let Some(mut record) = jobs.record(&id) else {
        return;
    };
    if !jobs.started(&id) {
        return;
    }
    let mut job = Job {
        jobs: &jobs,
        id: &id,
        spec: &record.spec,
        signal,
    };
    if !record.staged {
        match stage::stage(&record.spec, job.signal.clone()).await {
            Ok(None) => return,
            Err(message) => return jobs.fail(&id, message),
            Ok(Some(rows)) if jobs.staged(&id, rows) => record.rows_total = rows,
            // Cancelled between the staging and now: its cancel may have come before the
            // staged input existed.
            Ok(Some(_)) => return record.spec.discard_files(false),
        }
    }
    let outcome = match job.drive(&record).await {
        Ok(Outcome::Done) => match &record.spec.upload_to {
            Some(uri) => job
                .unless_stopped(stage::deliver(&record.spec, uri))
                .await
                .map_or(Ok(Outcome::Stopped), |delivered| {
                    delivered.map(|()| Outcome::Done)
                }),
            None => Ok(Outcome::Done),
        },
        other => other,
    };
    match outcome {
        Ok(Outcome::Done) => jobs.succeed(&id),
        Ok(Outcome::Stopped) => {}
        Err(message) => jobs.fail(&id, message),
    }
}

struct Job<'a> {
    jobs: &'a Jobs,
    id: &'a str,
    spec: &'a JobSpec,
    signal: watch::Receiver<Signal>,
}

impl Job<'_> {
    fn stopped(&self) -> bool {
        *self.signal.borrow() != Signal::Run
    }

    /// Waits for `future` unless the job is stopped first.
    async fn unless_stopped<T>(&mut self, future: impl Future<Output = T>) -> Option<T> {
        if self.stopped() {
            return None;
        }
        tokio::select! {
            out = future => Some(out),
            _ = self.signal.changed() => None,
        }
    }

    /// The model version to send rows to, loading it if it is cold.
    async fn resolve(&self) -> Result<ServedModel, ServeError> {
        let catalog = self.jobs.inner.catalog.snapshot();
        match catalog.resolve(&self.spec.model, self.spec.version.as_deref()) {
            Err(ServeError::ModelCold { model, version }) => {
                let load = self.jobs.inner.supervisor.send(EnsureLoaded {
                    name: model,
                    version: Some(version),
                });
                match tokio::time::timeout(LOAD_WAIT, load).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(ServeError::ShuttingDown),
                    Err(_) => Err(ServeError::NotReady {
                        model: self.spec.model.clone(),
                        reason: "still loading".into(),
                        retry_after: Duration::from_secs(1),
                    }),
                }
            }
            other => other,
        }
    }

    /// [`resolve`](Self::resolve), waiting out a version that is not serving for now.
    async fn resolve_patiently(&mut self) -> Result<Option<ServedModel>, String> {
        let mut attempt = 0;
        loop {
            match self.resolve().await {
                Ok(served) => return Ok(Some(served)),
                Err(e @ (ServeError::ModelNotFound(_) | ServeError::VersionNotFound { .. })) => {
                    return Err(e.to_string())
                }
                Err(e) if attempt >= RETRIES => return Err(e.to_string()),
                Err(_) => {}
            }
            attempt += 1;
            if self
                .unless_stopped(tokio::time::sleep(backoff(attempt)))
                .await
                .is_none()
            {
                return Ok(None);
            }
        }
    }

    async fn drive(&mut self, record: &JobRecord) -> Result<Outcome, String> {
        let mut progress = record.progress.clone();
        let part_path = self.spec.part_path();
        let mut part = match OpenOptions::new().write(true).open(&part_path) {
            Ok(part) => part,
            // Renamed already, its state not yet saved: it is complete.
            Err(_) if self.spec.output.exists() && progress.rows_done == record.rows_total => {
                return Ok(Outcome::Done)
            }
            Err(e) => return Err(format!("cannot open {}: {e}", part_path.display())),
        };
        let len = part.metadata().map_err(|e| e.to_string())?.len();
        if len < progress.part_bytes {
            return Err(format!(
                "{} has {len} bytes, fewer than the {} checkpointed",
                part_path.display(),
                progress.part_bytes
            ));
        }
        // Whatever was written after the last checkpoint is written again.
        part.set_len(progress.part_bytes)
            .and_then(|()| part.seek(SeekFrom::Start(progress.part_bytes)))
            .map_err(|e| format!("cannot cut {} to its checkpoint: {e}", part_path.display()))?;
        let mut input = File::open(&self.spec.input)
            .map(|f| BufReader::with_capacity(1 << 20, f))
            .map_err(|e| format!("cannot read {}: {e}", self.spec.input.display()))?;
        input
            .seek(SeekFrom::Start(progress.input_bytes))
            .map_err(|e| format!("cannot read {}: {e}", self.spec.input.display()))?;
        let mut read_pos = progress.input_bytes;
        let mut read_line = progress.line;
        let mut pace = self.spec.max_rows_per_sec.map(|n| {
            let mut every = tokio::time::interval(pace_period(n));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every
        });
        let Some(mut served) = self.resolve_patiently().await? else {
            return Ok(Outcome::Stopped);
        };
        let mut window: VecDeque<Row> = VecDeque::with_capacity(WINDOW);
        let mut window_bytes = 0usize;
        let mut chunk: Vec<u8> = Vec::new();
        let mut chunk_rows = 0u64;
        let mut last_checkpoint = Instant::now();
        let mut input_done = false;
        let mut bytes: Vec<u8> = Vec::new();
        loop {
            // Fill the window.
            while !input_done && has_room(window.len(), window_bytes) {
                bytes.clear();
                // Bounded, in case the file grew a longer line since it was checked. Read as
                // bytes: a line that is not UTF-8 is one malformed row, not an unreadable input.
                let n = (&mut input)
                    .take(MAX_LINE_BYTES as u64 + 1)
                    .read_until(b'\n', &mut bytes)
                    .map_err(|e| format!("cannot read {}: {e}", self.spec.input.display()))?;
                if n == 0 {
                    input_done = true;
                    break;
                }
                // The line's length without its newline, as the submission measured it.
                if n - usize::from(bytes.last() == Some(&b'\n')) > MAX_LINE_BYTES {
                    return Err(format!(
                        "line {} of the input is longer than {MAX_LINE_BYTES} bytes",
                        read_line + 1
                    ));
                }
                read_pos += n as u64;
                read_line += 1;
                // Blank as the submission counted it (ASCII whitespace only), so that
                // `rows_total` is the number of rows the job writes.
                if is_blank(&bytes) {
                    continue;
                }
                if let Some(pace) = pace.as_mut() {
                    if self.unless_stopped(pace.tick()).await.is_none() {
                        return Ok(Outcome::Stopped);
                    }
                }
                let (text, key, sent) = match String::from_utf8(std::mem::take(&mut bytes)) {
                    Ok(text) => {
                        let (key, sent) = send(&served, &text, &self.spec.key_field);
                        (text, key, sent)
                    }
                    Err(e) => (
                        String::new(),
                        Value::Null,
                        Err(format!("not UTF-8 text: {}", e.utf8_error())),
                    ),
                };
                window_bytes += text.len();
                window.push_back(Row {
                    line: read_line,
                    end: read_pos,
                    text,
                    key,
                    sent,
                });
            }
            let Some(row) = window.pop_front() else {
                break;
            };
            window_bytes -= row.text.len();
            let Some(answer) = self.answer(&mut served, row.sent, &row.text).await? else {
                return Ok(Outcome::Stopped);
            };
            match answer {
                Ok(response) => write_answer(
                    &mut chunk,
                    &self.jobs.inner.catalog,
                    row.line,
                    &row.key,
                    &served,
                    &response,
                ),
                Err(error) => {
                    // It may quote the row (a name, a datatype), which may be megabytes.
                    let error = bounded(error);
                    if self.spec.on_error == OnError::Stop {
                        return Err(format!("line {}: {error}", row.line));
                    }
                    progress.errors += 1;
                    if progress.first_errors.len() < KEPT_ERRORS {
                        progress.first_errors.push(RowError {
                            line: row.line,
                            error: error.clone(),
                        });
                    }
                    write_line(
                        &mut chunk,
                        &ErrorLine {
                            line: row.line,
                            key: &row.key,
                            error: &error,
                        },
                    );
                }
            }
            chunk_rows += 1;
            progress.line = row.line;
            progress.input_bytes = row.end;
            if chunk_rows >= CHUNK_ROWS
                || chunk.len() >= CHUNK_BYTES
                || last_checkpoint.elapsed() >= CHUNK_TIME
            {
                if !self.flush(&mut part, &mut chunk, &mut chunk_rows, &mut progress)? {
                    return Ok(Outcome::Stopped);
                }
                last_checkpoint = Instant::now();
                // A new default version, a reload: the next rows go where requests go now (on an
                // error, the rows' retries deal with it).
                if let Ok(now) = self.resolve().await {
                    served = now;
                }
            }
        }
        // Blank lines at the end count as consumed.
        progress.input_bytes = read_pos;
        if !self.flush(&mut part, &mut chunk, &mut chunk_rows, &mut progress)? {
            return Ok(Outcome::Stopped);
        }
        Ok(Outcome::Done)
    }

    /// A row's answer: the model's, or why the row is bad (`Err` inside). Refusals that pass
    /// (queue full, version loading, unloaded or taken out of service, a worker lost) send it
    /// again. `None`: stopped.
    async fn answer(
        &mut self,
        served: &mut ServedModel,
        sent: Result<Answer, String>,
        text: &str,
    ) -> Result<Option<Result<InferResponse, String>>, String> {
        let mut pending = match sent {
            Ok(answer) => answer,
            Err(bad) => return Ok(Some(Err(bad))),
        };
        // Failures (a lost worker, an inference error) count towards RETRIES; waits do not.
        let (mut attempt, mut waits) = (0, 0);
        loop {
            let Some(result) = self.unless_stopped(&mut pending).await else {
                return Ok(None);
            };
            match result {
                // The row must be answered by the version asked for: one handed to the
                // fallback (the model is squeezed) waits and goes again.
                Ok(response) if response.degraded => {}
                Ok(response) => return Ok(Some(Ok(response))),
                Err(ServeError::InvalidRequest(bad)) => return Ok(Some(Err(bad))),
                // Online traffic first: a job waits out a busy or reloading model for as long
                // as it takes.
                Err(
                    ServeError::Overloaded { .. }
                    | ServeError::Busy { .. }
                    | ServeError::NotReady { .. }
                    | ServeError::ModelCold { .. }
                    | ServeError::ModelUnavailable { .. }
                    | ServeError::VersionRetired { .. }
                    | ServeError::DeadlineExceeded { .. },
                ) => {}
                Err(e) if attempt >= RETRIES => {
                    return Err(format!("the model keeps failing: {e}"))
                }
                Err(_) => attempt += 1,
            }
            waits += 1;
            if self
                .unless_stopped(tokio::time::sleep(backoff(waits)))
                .await
                .is_none()
            {
                return Ok(None);
            }
            let Some(now) = self.resolve_patiently().await? else {
                return Ok(None);
            };
            *served = now;
            match send(served, text, &self.spec.key_field).1 {
                Ok(answer) => pending = answer,
                Err(bad) => return Ok(Some(Err(bad))),
            }
        }
    }

    /// Appends the chunk to the `.part` file, fsyncs it, and checkpoints. False: the job was
    /// cancelled meanwhile.
    fn flush(
        &self,
        part: &mut File,
        chunk: &mut Vec<u8>,
        chunk_rows: &mut u64,
        progress: &mut Checkpoint,
    ) -> Result<bool, String> {
        part.write_all(chunk)
            .and_then(|()| part.sync_data())
            .map_err(|e| format!("cannot write {}: {e}", self.spec.part_path().display()))?;
        progress.part_bytes += chunk.len() as u64;
        progress.rows_done += *chunk_rows;
        chunk.clear();
        *chunk_rows = 0;
        self.jobs.checkpoint(self.id, progress)
    }
}

/// The time between two rows at `rows_per_sec`: never zero, which `tokio::time::interval`
/// refuses with a panic (a rate above a billion rows a second rounds to zero nanoseconds).
/// Whether the window takes another row, holding `rows` rows of `bytes` bytes of lines.
fn has_room(rows: usize, bytes: usize) -> bool {
    rows < WINDOW && (rows == 0 || bytes < WINDOW_BYTES)
}

fn pace_period(rows_per_sec: u32) -> Duration {
    Duration::from_secs_f64(1.0 / f64::from(rows_per_sec.max(1))).max(Duration::from_nanos(1))
}

/// The longest row error kept: it is in the state file (rewritten at every checkpoint), in
/// every `GET /v2/jobs`, and in the row's output line.
const MAX_ERROR_BYTES: usize = 1024;

/// `error` cut to [`MAX_ERROR_BYTES`] (at a character boundary), saying how long it was.
fn bounded(mut error: String) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error;
    }
    let full = error.len();
    let mut cut = MAX_ERROR_BYTES;
    while !error.is_char_boundary(cut) {
        cut -= 1;
    }
    error.truncate(cut);
    error.push_str(&format!("... ({full} bytes)"));
    error
}

/// A line that is no row: only ASCII whitespace (what `submit::count_rows` skips).
pub(super) fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(2000))
}

/// Decodes one input line as the REST API decodes a request, validates it against the
/// version and sends it on the low-priority lane: the row's key, and its answer to come or
/// why the line is bad.
fn send(served: &ServedModel, text: &str, key_field: &str) -> (Value, Result<Answer, String>) {
    let fields: std::collections::HashMap<&str, &RawValue> = match serde_json::from_str(text) {
        Ok(fields) => fields,
        Err(e) => return (Value::Null, Err(format!("not a JSON object: {e}"))),
    };
    let key = fields
        .get(key_field)
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or(Value::Null);
    let sent = (|| {
        let inputs = fields.get("inputs").ok_or("no \"inputs\"")?;
        let inputs: Vec<TensorJson> =
            serde_json::from_str(inputs.get()).map_err(|e| format!("\"inputs\": {e}"))?;
        let inputs = inputs
            .iter()
            .map(TensorJson::decode)
            .collect::<Result<Vec<_>, String>>()?;
        let outputs = match fields.get("outputs") {
            None => None,
            Some(raw) => {
                #[derive(serde::Deserialize)]
                struct Named {
                    name: String,
                }
                let named: Vec<Named> =
                    serde_json::from_str(raw.get()).map_err(|e| format!("\"outputs\": {e}"))?;
                Some(named.into_iter().map(|n| n.name).collect())
            }
        };
        let request = served
            .info
            .validate(inputs, outputs)
            .map_err(|e| e.to_string())?;
        let answer: Answer =
            Box::pin(served.infer(request, InferOptions::now().with_priority(Priority::Low)));
        Ok::<_, String>(answer)
    })();
    (key, sent.map_err(|e| e.to_string()))
}

#[derive(Serialize)]
struct OutputTensor<'a> {
    name: &'a str,
    shape: &'a [i64],
    datatype: DataType,
    data: &'a TensorData,
}

#[derive(Serialize)]
struct AnswerLine<'a> {
    line: u64,
    key: &'a Value,
    model: &'a str,
    model_version: &'a str,
    sha256: &'a str,
    outputs: Vec<OutputTensor<'a>>,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    line: u64,
    key: &'a Value,
    error: &'a str,
}

fn write_line(chunk: &mut Vec<u8>, line: &impl Serialize) {
    serde_json::to_writer(&mut *chunk, line).expect("an output line serialises");
    chunk.push(b'\n');
}

/// The answer's line, naming the version that computed it (the fallback's, when the row was
/// handed to it) and that version's sha256.
fn write_answer(
    chunk: &mut Vec<u8>,
    catalog: &crate::actors::catalog::SharedCatalog,
    line: u64,
    key: &Value,
    served: &ServedModel,
    response: &InferResponse,
) {
    let (model, version) = (&response.served_by.0, &response.served_by.1);
    let sha256 = if *model == served.info.name && *version == served.info.version {
        served.info.sha256.clone()
    } else {
        // Another version than the job's now: the one before a deployment (unloaded since,
        // perhaps), or the fallback.
        catalog
            .snapshot()
            .sha256_of(model, version)
            .unwrap_or_default()
            .to_string()
    };
    write_line(
        chunk,
        &AnswerLine {
            line,
            key,
            model,
            model_version: version,
            sha256: &sha256,
            outputs: response
                .outputs
                .iter()
                .map(|t| OutputTensor {
                    name: &t.name,
                    shape: &t.shape,
                    datatype: t.data.datatype(),
                    data: &t.data,
                })
                .collect(),
        },
    );
}

#[cfg(test)]
mod tests;
