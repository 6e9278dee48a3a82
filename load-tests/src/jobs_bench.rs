//! Batch jobs beside online traffic, `loadgen jobs`: one in-process streamserve on `mlp`
//! (replicas 2, batching on, as `protocols` and `monitoring`) with the jobs API on, and
//! closed-loop REST JSON load of 1-row requests at each concurrency alone and with a batch job
//! running, the order alternating by round (alone with, then with alone); the job alone, with
//! no online load, before and after the levels is its idle ceiling. Each "with" slice submits
//! a fresh job as its warm-up begins and cancels it as its measured period ends; the job's
//! rows/s come from `rows_done` polled through `GET /v2/jobs/{id}`. The measuring, the levels'
//! JSON and the plot are `protocols`' ([`Schedule`], [`levels_json`],
//! [`crate::plots::protocols`]), the two loads standing for its clients; the report is
//! `templates/jobs.md.j2`.

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use streamserve::config::{Config, GrpcPort};
use tokio::time::Instant;

use crate::bench::{cpu_since, start_server_with, stop_server, ServerSetup, TempModelDir};
use crate::cli::{count, secs};
use crate::protocols::results::{levels_json, render_report, Client, Level};
use crate::protocols::{MlpClosedLoop, RestSlice, Schedule, CONTENDED_CORES};
use crate::rest;
use crate::stream_steps::ratio;
use crate::sysinfo::{CpuShare, CpuSnapshot};

/// The plot written beside `report.md` (`protocols`' plot of this run's results).
pub const PLOT_FILE: &str = "jobs.svg";
/// The report's title.
pub const TITLE: &str = "streamserve batch jobs beside online traffic: `mlp` online throughput and latency with and without a job, and the job's rows/s";
/// How often a running job's progress is read.
const POLL: Duration = Duration::from_millis(100);

/// The two online loads compared; the first is the baseline of the ratios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    Alone,
    WithJob,
}

pub const VARIANTS: [Load; 2] = [Load::Alone, Load::WithJob];

impl Client for Load {
    fn key(self) -> &'static str {
        ["alone", "with_job"][self as usize]
    }
    fn label(self) -> &'static str {
        ["online alone", "with a job"][self as usize]
    }
}

/// The loads in round `round` (from 0): alone with, then with alone, ...
pub fn order(round: usize) -> Vec<Load> {
    crate::protocols::alternating(&VARIANTS, round)
}

/// `loadgen jobs`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct JobsOptions {
    /// Concurrency levels (requests in flight, closed loop), comma-separated.
    #[arg(long = "concurrency", value_name = "CONCURRENCY", value_delimiter = ',', default_values_t = [1usize, 8, 32],
          value_parser = count(1, crate::rest::MAX_CONCURRENCY))]
    pub concurrencies: Vec<usize>,
    /// Measured seconds of each slice (one load, one level, one round; and the job alone).
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "3", value_parser = secs(1, 120))]
    pub duration: Duration,
    /// Unmeasured warm-up seconds before each slice's measured period.
    #[arg(long = "warmup-secs", value_name = "WARMUP_SECS", default_value = "1", value_parser = secs(0, 60))]
    pub warmup: Duration,
    /// Rounds per level, the loads' order reversed every other round (alone with, with alone, ...).
    #[arg(long, default_value_t = 4, value_parser = count(1, 8))]
    pub rounds: usize,
    /// Rows of the job's input (~5 KB each, written once to a temporary directory and removed
    /// at the end); a job must outlast a slice's warm-up and measured period.
    #[arg(long, default_value_t = 90_000, value_parser = count(1000, 95_000))]
    pub job_rows: usize,
    #[command(flatten)]
    pub mlp: MlpClosedLoop,
}

/// What one job did over one measured period.
#[derive(Clone, Debug, serde::Serialize)]
pub struct JobSlice {
    /// Rows/s between the first and the last change of `rows_done` seen in the period (it moves
    /// a checkpointed chunk at a time), or over the whole period when it changed less than twice.
    pub rows_per_s: Option<f64>,
    /// Rows done during the period, and its seconds.
    pub rows: u64,
    pub secs: f64,
    /// The server's own `rows_per_sec` at the period's end (since the job started).
    pub server_rows_per_s: Option<f64>,
    /// The job had done every row before the period ended (give more `--job-rows`).
    pub ran_out: bool,
    /// CPU used during a job-alone slice (with online load, the online slice's is it).
    pub cpu: Option<CpuShare>,
}

impl JobSlice {
    /// From `seen`: (seconds into the period, `rows_done`) at its start and at each change.
    fn from_progress(seen: &[(f64, u64)], secs: f64, ran_out: bool, server: Option<f64>) -> Self {
        let rows = seen.first().zip(seen.last()).map_or(0, |(f, l)| l.1 - f.1);
        let rows_per_s = match seen.get(1..) {
            Some([a, .., b]) => ratio(b.1.saturating_sub(a.1) as f64, b.0 - a.0),
            _ => ratio(rows as f64, secs),
        };
        JobSlice {
            rows_per_s,
            rows,
            secs,
            server_rows_per_s: server,
            ran_out,
            cpu: None,
        }
    }
}

/// The server's jobs API, and the files its jobs read and write.
struct JobApi {
    client: reqwest::Client,
    /// `http://<addr>/v2/jobs`.
    url: String,
    token: String,
    input: PathBuf,
    outputs: PathBuf,
    submitted: Cell<usize>,
}

impl JobApi {
    async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request.bearer_auth(&self.token).send().await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(
            status.is_success(),
            "the jobs API answered {status}: {body}"
        );
        Ok(body)
    }

    /// A job submitted as this call begins, followed over the measured period from `warmup`
    /// after that for `duration`, then cancelled and its output (if it finished) removed.
    async fn slice(&self, warmup: Duration, duration: Duration) -> anyhow::Result<JobSlice> {
        let from = Instant::now() + warmup;
        let n = self.submitted.replace(self.submitted.get() + 1);
        let output = self.outputs.join(format!("out-{n}.jsonl"));
        let body = json!({"model": "mlp", "input": self.input, "output": output});
        let job = self.call(self.client.post(&self.url).json(&body)).await?;
        let id = job["id"].as_str().context("a job without an id")?;
        let url = format!("{}/{id}", self.url);
        let followed = self.follow(&url, from, duration).await;
        let _ = self.call(self.client.delete(&url)).await; // 409 when it has already ended
        let _ = std::fs::remove_file(output);
        followed
    }

    /// The job at `url`, polled over the measured period.
    async fn follow(
        &self,
        url: &str,
        from: Instant,
        duration: Duration,
    ) -> anyhow::Result<JobSlice> {
        tokio::time::sleep_until(from).await;
        // Later than `from` when the submission (which counts the input's rows) took longer.
        let (begun, end) = (Instant::now(), from + duration);
        let mut seen: Vec<(f64, u64)> = Vec::new();
        loop {
            let job = self.call(self.client.get(url)).await?;
            anyhow::ensure!(job["state"] != "failed", "{url} failed: {}", job["message"]);
            let (at, rows) = (
                begun.elapsed().as_secs_f64(),
                job["rows_done"].as_u64().unwrap_or(0),
            );
            if seen.last().is_none_or(|s| s.1 != rows) {
                seen.push((at, rows));
            }
            let ran_out = job["state"] == "succeeded";
            if ran_out || Instant::now() >= end {
                return Ok(JobSlice::from_progress(
                    &seen,
                    at,
                    ran_out,
                    job["rows_per_sec"].as_f64(),
                ));
            }
            tokio::time::sleep(POLL.min(end - Instant::now())).await;
        }
    }
}

/// Writes the job's input: `rows` lines, each a 1-row request body of the online load
/// ([`rest::mlp_request`], 64 different ones in turn) with a `key` added; returns its bytes.
fn write_input(path: &Path, rows: usize) -> anyhow::Result<u64> {
    let bodies: Vec<_> = (0..64)
        .map(|i| rest::mlp_request(1, 0x10B5_0000 + i, false).body)
        .collect();
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for n in 0..rows {
        let body = &bodies[n % bodies.len()];
        out.write_all(&body[..body.len() - 1])?; // without its closing `}`
        writeln!(out, ",\"key\":\"row-{n}\"}}")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(std::fs::metadata(path)?.len())
}

/// Runs the whole benchmark and writes its report: about (levels × rounds × 2 + 2) ×
/// (warm-up + duration), plus the quiet checks and writing the job's input.
pub fn run(options: &JobsOptions) -> anyhow::Result<crate::report::Outcome> {
    anyhow::ensure!(
        !options.concurrencies.is_empty() && options.concurrencies.len() <= 16,
        "give 1 to 16 concurrency levels"
    );
    let start = crate::report::Start::now(options.mlp.common.out.as_deref(), "jobs-mlp");
    let (model_file, sha256) = crate::bench::model_file_and_sha256(&options.mlp.model_file)?;
    let setup = ServerSetup::batching_on();
    // The job's files live beside the manifest, and go with it.
    let models = TempModelDir::create("jobs", &setup.manifest(&model_file, &sha256))?;
    let files = models.path.join("job-files");
    std::fs::create_dir_all(files.join("out"))?;
    let input_bytes = write_input(&files.join("input.jsonl"), options.job_rows)?;
    let token = format!("loadgen-{}-{}", std::process::id(), start.started_at);
    let config = Config {
        models: models.path.clone(),
        drain_secs: 2,
        grpc_port: Some(GrpcPort::Off),
        admin_token: Some(token.clone()),
        jobs_dir: files.join("state"),
        ..Default::default()
    };
    let running = start_server_with(config, "mlp", setup.max_batch_size)?;
    eprintln!(
        "[jobs] streamserve on http://{}, job input {} rows ({:.0} MB); {} levels x {} rounds x 2, and the job alone twice",
        running.addr, options.job_rows, input_bytes as f64 / 1e6, options.concurrencies.len(), options.rounds
    );
    let measured =
        crate::sysinfo::client_runtime(options.mlp.common.threads.get()).and_then(|rt| {
            let api = JobApi {
                client: rest::http_client(2, options.mlp.request_timeout)?,
                url: format!("http://{}/v2/jobs", running.addr),
                token,
                input: files.join("input.jsonl"),
                outputs: files.join("out"),
                submitted: Cell::new(0),
            };
            let job_alone = |when: &str| -> anyhow::Result<JobSlice> {
                if !options.mlp.common.quiet_wait.is_zero() {
                    crate::sysinfo::wait_for_quiet(
                        crate::sysinfo::QUIET_CORES,
                        options.mlp.common.quiet_wait,
                    );
                }
                let before = CpuSnapshot::take();
                let mut job = rt.block_on(api.slice(options.warmup, options.duration))?;
                job.cpu = cpu_since(before);
                log_job(&format!("job alone, {when}"), &job);
                Ok(job)
            };
            let first = job_alone("before")?;
            // Each "with a job" slice's job, by (concurrency, round); a round run again follows
            // the one set aside, so the last of each is the one kept.
            let (round, jobs) = (Cell::new(0), RefCell::new(Vec::new()));
            let schedule = Schedule {
                tag: "jobs",
                concurrencies: &options.concurrencies,
                rounds: options.rounds,
                quiet_wait: options.mlp.common.quiet_wait,
            };
            let levels = schedule.measure(
                |r| {
                    round.set(r);
                    order(r)
                },
                |load, concurrency| {
                    let slice = RestSlice {
                        concurrency,
                        rows: 1,
                        binary: false,
                        warmup: options.warmup,
                        duration: options.duration,
                    };
                    let online = options.mlp.rest_load(running.addr, slice);
                    if load == Load::Alone {
                        return rt.block_on(rest::run(&online));
                    }
                    let job = api.slice(options.warmup, options.duration);
                    let (online, job) =
                        rt.block_on(async { tokio::join!(rest::run(&online), job) });
                    let job = job?;
                    log_job(
                        &format!("c={concurrency} round {} job", round.get() + 1),
                        &job,
                    );
                    jobs.borrow_mut().push((concurrency, round.get(), job));
                    online
                },
            )?;
            let last = job_alone("after")?;
            Ok((levels, [first, last], jobs.into_inner()))
        });
    stop_server(&running);
    drop(models);
    let (levels, ceiling, jobs) = measured?;

    let json = results_json(
        (&start, options, &setup, input_bytes),
        &ceiling,
        &levels,
        &jobs,
    );
    let (elapsed, file) = (start.at.elapsed(), (model_file.as_path(), sha256.as_str()));
    let report = render_report(("jobs", TITLE), &json, elapsed, file, PLOT_FILE)?;
    let plot = Some((PLOT_FILE, crate::plots::protocols as _));
    crate::report::save_run(start.dir, "jobs", report, &json, plot)
}

fn log_job(what: &str, job: &JobSlice) {
    eprintln!(
        "[jobs]   {what}: {} rows/s ({} rows in {:.1} s; the server says {}){}",
        job.rows_per_s.map_or("n/a".into(), |r| format!("{r:.0}")),
        job.rows,
        job.secs,
        job.server_rows_per_s
            .map_or("n/a".into(), |r| format!("{r:.0}")),
        if job.ran_out { ", RAN OUT of rows" } else { "" },
    );
}

/// The mean of the known figures.
fn mean(xs: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let known: Vec<f64> = xs.flatten().collect();
    ratio(known.iter().sum(), known.len() as f64)
}

/// `results.json`: the run's settings, the job alone (`ceiling`), and per level both loads'
/// combined runs (with a job's ratios to alone) and the job's rows/s against the ceiling.
pub fn results_json(
    (start, options, setup, input_bytes): (&crate::report::Start, &JobsOptions, &ServerSetup, u64),
    ceiling: &[JobSlice],
    levels: &[Level<Load>],
    jobs: &[(usize, usize, JobSlice)],
) -> Value {
    let idle = mean(ceiling.iter().map(|j| j.rows_per_s));
    let mut levels_json = levels_json(levels, &VARIANTS, order, options.rounds);
    for (level, json) in levels.iter().zip(&mut levels_json) {
        let kept: Vec<&JobSlice> = (0..options.rounds)
            .filter_map(|r| {
                jobs.iter()
                    .rev()
                    .find(|j| (j.0, j.1) == (level.concurrency, r))
            })
            .map(|j| &j.2)
            .collect();
        let rate = mean(kept.iter().map(|j| j.rows_per_s));
        json["job"] = json!({
            "rows_per_s": rate, "of_ceiling": rate.and_then(|r| ratio(r, idle?)),
            "ran_out": kept.iter().any(|j| j.ran_out), "slices": kept,
        });
    }
    let body = json!({
        "loadavg_at_end": crate::sysinfo::MachineInfo::collect().loadavg_at_start,
        "setup": setup,
        "plot_title": "mlp, 1 row/request: online alone vs with a batch job running, one server (closed loop)",
        "protocols": VARIANTS.map(|v| json!({"key": v.key(), "label": v.label()})),
        "baseline": Load::Alone.key(),
        "baseline_label": Load::Alone.label(),
        "rows_per_request": 1,
        "rounds": options.rounds,
        "warmup_s": options.warmup.as_secs_f64(),
        "slice_s": options.duration.as_secs_f64(),
        "client_threads": options.mlp.common.threads.get(),
        "contended_cores": CONTENDED_CORES,
        "job_rows": options.job_rows,
        "input_bytes": input_bytes,
        "poll_ms": POLL.as_millis() as u64,
        "ceiling": {"rows_per_s": idle, "slices": ceiling, "ran_out": ceiling.iter().any(|j| j.ran_out)},
        "levels": levels_json,
    });
    start.results_json(Some("jobs"), &options.mlp.common.command, body)
}
