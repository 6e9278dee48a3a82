//! A job as the API shows it (`GET /v2/jobs`, docs/jobs.md): its record, and while it
//! runs, its rate and the time left.

use serde_json::{json, Value};

use super::{Entry, JobState};

/// A job as the API shows it: its record, and while it runs, its rate and time left.
pub(super) fn view(entry: &Entry) -> Value {
    let record = &entry.record;
    let progress = &record.progress;
    let rate = match (record.state, entry.started) {
        (JobState::Running, Some((since, rows_then))) => {
            let secs = since.elapsed().as_secs_f64();
            (secs > 0.0).then(|| progress.rows_done.saturating_sub(rows_then) as f64 / secs)
        }
        _ => None,
    };
    let left = record.rows_total.saturating_sub(progress.rows_done);
    let eta = rate
        .filter(|r| *r > 0.0)
        .map(|r| (left as f64 / r).ceil() as u64);
    json!({
        "id": record.id,
        "state": record.state,
        "model": record.spec.model,
        "version": record.spec.version,
        "input": record.spec.input_name(),
        "output": record.spec.output_name(),
        "key_field": record.spec.key_field,
        "on_error": record.spec.on_error,
        "max_rows_per_sec": record.spec.max_rows_per_sec,
        "publish": record.spec.publish,
        "rows_total": record.staged.then_some(record.rows_total),
        "rows_done": progress.rows_done,
        "rows_per_sec": rate.map(|r| (r * 10.0).round() / 10.0),
        "eta_secs": eta,
        "errors": progress.errors,
        "error_lines": progress.first_errors.iter().map(|e| e.line).collect::<Vec<_>>(),
        "first_errors": progress.first_errors,
        "message": record.message,
        "created_unix_ms": record.created_unix_ms,
        "finished_unix_ms": record.finished_unix_ms,
    })
}
