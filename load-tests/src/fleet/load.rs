//! The drill's client: `concurrency` tasks sending 1-row `mlp` inference requests through
//! haproxy at a steady pace (`rate` requests/s in all, each task on its own schedule, a task
//! whose answer comes late simply sends its next one late), recording for every answer when it
//! came, its status, the `model_version` that served it and the `X-Served-By` instance that
//! haproxy stamped on it. Bounded: each request has a timeout, and the load stops when told
//! or at its deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::rest::{self, RequestBody};

/// One answer (or failure) the load saw.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Answer {
    /// When it was sent and when its answer was complete, s since the drill's start.
    pub sent_s: f64,
    pub t_s: f64,
    /// HTTP status; 0 for a transport error (no answer).
    pub status: u16,
    /// `model_version` of a valid 200 answer.
    pub version: Option<String>,
    /// The instance haproxy sent it to (`X-Served-By`), when it said.
    pub served_by: Option<String>,
    /// Why it failed: a transport error, a non-200 status's body, an invalid 200.
    pub error: Option<String>,
}

impl Answer {
    pub fn ok(&self) -> bool {
        self.status == 200 && self.version.is_some() && self.error.is_none()
    }
}

/// Requests per second of the drill's load, at most.
pub const MAX_RATE: f64 = 2000.0;

/// The running load, stopped with [`Load::finish`] (or when dropped: its tasks are aborted).
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Answer>>>,
}

impl Load {
    /// Starts `concurrency` tasks on `runtime` against `base` (haproxy), `rate` requests/s in
    /// all, times relative to `t0`; each stops by itself at `deadline`.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        base: &str,
        concurrency: usize,
        rate: f64,
        t0: Instant,
        deadline: Instant,
    ) -> anyhow::Result<Load> {
        let url = rest::check_loopback(base)?
            .join("v2/models/mlp/infer")
            .context("cannot build the inference URL")?;
        let client = rest::http_client(concurrency, Duration::from_secs(10))?;
        let stop = Arc::new(AtomicBool::new(false));
        let every = Duration::from_secs_f64(concurrency as f64 / rate.clamp(0.1, MAX_RATE));
        let tasks = (0..concurrency)
            .map(|i| {
                let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
                let body = rest::mlp_request(1, 0xF1EE_7000 + i as u64, false);
                // Spread the tasks' schedules over one period.
                let first = Instant::now() + every.mul_f64(i as f64 / concurrency as f64);
                runtime.spawn(async move {
                    let mut tick = tokio::time::interval_at(first.into(), every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut answers = Vec::new();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        tick.tick().await;
                        answers.push(send_one(&client, &url, &body, t0).await);
                    }
                    answers
                })
            })
            .collect();
        Ok(Load { stop, tasks })
    }

    /// Stops the tasks and returns every answer, in the order they came.
    pub fn finish(mut self, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Vec<Answer>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in std::mem::take(&mut self.tasks) {
            let answers = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(20), task).await })
                .context("a load task did not stop within 20 s")?
                .context("a load task failed")?;
            all.extend(answers);
        }
        all.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
        Ok(all)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn send_one(
    client: &reqwest::Client,
    url: &reqwest::Url,
    body: &RequestBody,
    t0: Instant,
) -> Answer {
    let sent_s = t0.elapsed().as_secs_f64();
    let request = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.body.clone());
    let (status, served_by, result) = match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let served_by = response
                .headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let result = response.bytes().await.map_err(|e| format!("body: {e}"));
            (status, served_by, result)
        }
        Err(e) => (0, None, Err(format!("transport: {e}"))),
    };
    let (version, error) = match result {
        Ok(bytes) if status == 200 => match parse_answer(&bytes) {
            Ok(version) => (Some(version), None),
            Err(e) => (None, Some(e)),
        },
        Ok(bytes) => (
            None,
            Some(String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned()),
        ),
        Err(e) => (None, Some(e)),
    };
    Answer {
        sent_s,
        t_s: t0.elapsed().as_secs_f64(),
        status,
        version,
        served_by,
        error,
    }
}

/// The `model_version` of a 200 answer, after checking its outputs (`[1, 16]` FP32).
pub fn parse_answer(bytes: &[u8]) -> Result<String, String> {
    rest::check_mlp_response(bytes, None, 1)?;
    let json: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("response JSON: {e}"))?;
    json["model_version"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "the answer has no model_version".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_gives_its_version_once_checked() {
        let data: Vec<f32> = vec![0.5; 16];
        let good = serde_json::json!({
            "model_name": "mlp", "model_version": "3",
            "outputs": [{ "name": "probs", "datatype": "FP32", "shape": [1, 16], "data": data }],
        });
        assert_eq!(
            parse_answer(&serde_json::to_vec(&good).unwrap()).unwrap(),
            "3"
        );
        let mut unversioned = good.clone();
        unversioned.as_object_mut().unwrap().remove("model_version");
        let e = parse_answer(&serde_json::to_vec(&unversioned).unwrap()).unwrap_err();
        assert!(e.contains("model_version"), "{e}");
        let mut short = good;
        short["outputs"][0]["shape"] = serde_json::json!([1, 8]);
        assert!(parse_answer(&serde_json::to_vec(&short).unwrap()).is_err());
        assert!(parse_answer(b"not json").is_err());
    }
}
