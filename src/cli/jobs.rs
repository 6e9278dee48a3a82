//! `streamserve jobs submit|status|list|cancel`: batch prediction jobs (docs/jobs.md) from the
//! command line, against a running server (`--url`, `STREAMSERVE_URL`) with its admin token
//! (`--token`, `STREAMSERVE_ADMIN_TOKEN`). `status --wait` (and `submit --wait`) print a
//! progress line until the job ends, and fail unless it succeeded.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Args)]
pub struct JobsArgs {
    /// Base URL of the server.
    #[arg(long, env = "STREAMSERVE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The server's admin token (jobs read and write files on the server).
    #[arg(long, env = "STREAMSERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(subcommand)]
    pub command: JobsCommand,
}

/// The token never prints.
impl std::fmt::Debug for JobsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobsArgs")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("command", &self.command)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Run a JSON Lines file of KServe v2 requests (or a .npy array) through MODEL; prints
    /// the job.
    Submit {
        model: String,
        /// The input, as the server sees it: a path (absolute, or relative to its working
        /// directory) or an object-store URI (s3://bucket/path/rows.jsonl).
        #[arg(long)]
        input: String,
        /// Where the answers go (a path or a URI); must not exist yet.
        #[arg(long)]
        output: String,
        /// For a .npy input: the model input its rows go to [default: the only one].
        #[arg(long)]
        input_name: Option<String>,
        /// When the job succeeds, serve its answers by key
        /// (GET /v2/models/MODEL/predictions/KEY).
        #[arg(long)]
        publish: bool,
        #[arg(long)]
        version: Option<String>,
        /// The field of each line that is its key [default: key].
        #[arg(long)]
        key_field: Option<String>,
        /// What a malformed row does: stop the job (the default) or be skipped and reported.
        #[arg(long, value_enum)]
        on_error: Option<OnErrorArg>,
        /// Rows per second at most.
        #[arg(long)]
        max_rows_per_sec: Option<u32>,
        /// Follow the job until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// One job: state, rows done and total, rate, errors, time left.
    Status {
        id: String,
        /// Print a progress line until the job ends; fail unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Every job this server knows.
    List,
    /// Stop a job and remove its partial output.
    Cancel { id: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnErrorArg {
    Stop,
    Skip,
}

struct Client {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let response = match (method, body) {
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.auth)
                .call(),
            (_, Some(body)) => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .send_json(body),
            (_, None) => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
        };
        let mut response = response.map_err(|e| anyhow::anyhow!("{method} {url}: {e}"))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(value)
        } else {
            let message = value["error"]
                .as_str()
                .map_or(value.to_string(), str::to_string);
            anyhow::bail!("{method} {url}: {status}: {message}")
        }
    }
}

fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// `job-1 running 3072/10000 rows (30.7%), 10392.3 rows/s, 0 errors, 1 s left`
pub fn progress_line(job: &Value) -> String {
    let done = job["rows_done"].as_u64().unwrap_or(0);
    let Some(total) = job["rows_total"].as_u64() else {
        // An object or a .npy input is counted once staged; a job that ended before (its
        // staging failed, or it was cancelled) says why, not that it is staging.
        let (id, state) = (job["id"].as_str().unwrap_or("?"), job["state"].as_str());
        return match (state, job["message"].as_str()) {
            (Some("queued" | "running"), _) => {
                format!("{id} {} staging the input", state.unwrap_or("?"))
            }
            (state, Some(message)) => format!(
                "{id} {} before its input was staged: {message}",
                state.unwrap_or("?")
            ),
            (state, None) => format!("{id} {} before its input was staged", state.unwrap_or("?")),
        };
    };
    let percent = if total > 0 {
        100.0 * done as f64 / total as f64
    } else {
        100.0
    };
    let mut line = format!(
        "{} {} {done}/{total} rows ({percent:.1}%), {} errors",
        job["id"].as_str().unwrap_or("?"),
        job["state"].as_str().unwrap_or("?"),
        job["errors"].as_u64().unwrap_or(0),
    );
    if let Some(rate) = job["rows_per_sec"].as_f64() {
        line.push_str(&format!(", {rate} rows/s"));
    }
    if let Some(eta) = job["eta_secs"].as_u64() {
        line.push_str(&format!(", {eta} s left"));
    }
    if let Some(message) = job["message"].as_str() {
        line.push_str(&format!(": {message}"));
    }
    line
}

fn wait(client: &Client, id: &str) -> anyhow::Result<()> {
    loop {
        let job = client.call("GET", &format!("/v2/jobs/{id}"), None)?;
        eprintln!("{}", progress_line(&job));
        match job["state"].as_str() {
            Some("succeeded") => {
                print(&job);
                return Ok(());
            }
            Some("failed" | "cancelled") => {
                print(&job);
                anyhow::bail!("job {id} did not succeed")
            }
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

pub fn run(args: JobsArgs) -> anyhow::Result<()> {
    let client = Client {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into(),
        base: args.url.trim_end_matches('/').to_string(),
        auth: format!("Bearer {}", args.token.trim()),
    };
    match args.command {
        JobsCommand::Submit {
            model,
            input,
            output,
            version,
            key_field,
            on_error,
            max_rows_per_sec,
            input_name,
            publish,
            wait: follow,
        } => {
            let on_error = on_error.map(|o| match o {
                OnErrorArg::Stop => "stop",
                OnErrorArg::Skip => "skip",
            });
            let body = json!({"model": model, "version": version, "input": input, "output": output,
                              "key_field": key_field, "on_error": on_error, "max_rows_per_sec": max_rows_per_sec,
                              "input_name": input_name, "publish": publish});
            let job = client.call("POST", "/v2/jobs", Some(body))?;
            if follow {
                wait(&client, job["id"].as_str().unwrap_or_default())
            } else {
                print(&job);
                Ok(())
            }
        }
        JobsCommand::Status { id, wait: true } => wait(&client, &id),
        JobsCommand::Status { id, wait: false } => {
            print(&client.call("GET", &format!("/v2/jobs/{id}"), None)?);
            Ok(())
        }
        JobsCommand::List => {
            let list = client.call("GET", "/v2/jobs", None)?;
            for job in list["jobs"].as_array().into_iter().flatten() {
                println!("{}", progress_line(job));
            }
            Ok(())
        }
        JobsCommand::Cancel { id } => {
            print(&client.call("DELETE", &format!("/v2/jobs/{id}"), None)?);
            Ok(())
        }
    }
}
