//! Closed-loop REST load: `concurrency` tasks, each sending one Open Inference Protocol
//! inference request at a time to `POST /v2/models/{model}/infer` and the next as soon as the
//! answer is in, for a warm-up period (not measured) and then a measured period.
//!
//! Every answer is checked, not just counted: a 200 whose body does not parse, or whose
//! outputs are not FP32 `[rows, 16]` with the right amount of data, counts as an error.
//!
//! This file holds the options and the URL checks; `protocol` builds the request bodies and
//! checks the answers, `load` runs the loop and `report` holds what it measured.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use reqwest::Url;

use crate::cli::{count, secs};

mod load;
mod protocol;
mod report;
#[cfg(test)]
mod tests;

pub use load::run;
pub(crate) use load::{http_client, join_tallies, progress_ticks, send_one, Failure};
pub use protocol::{check_mlp_response, mlp_request, RequestBody, ServerSide};
pub use report::RestReport;

/// Header of the binary tensor data extension: the length of the JSON part of a body.
/// Pooled connections idle this long are dropped by the client itself: below the 5 s
/// keep-alive of common servers (uvicorn, actix's default), so that the client never sends on
/// a connection the server is closing (a "connection closed before message completed" error
/// that would be the load generator's doing, not the server's).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub const HEADER_CONTENT_LENGTH: &str = "Inference-Header-Content-Length";

/// Upper bounds that keep any run finite and modest.
pub const MAX_CONCURRENCY: usize = 1024;
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_ROWS: usize = 4096;

/// `loadgen rest`'s options (closed loop; `--rate` and its bound are the open loop's).
#[derive(Clone, Debug, clap::Args)]
pub struct RestOptions {
    /// Server base URL; loopback IP addresses only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model to load; it must have the mlp interface (FP32 features [rows, 256] -> [rows, 16]).
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Requests in flight at once (closed loop).
    #[arg(long, default_value_t = 8, value_parser = count(1, MAX_CONCURRENCY))]
    pub concurrency: usize,
    /// Measured seconds.
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "10", value_parser = secs(1, 3600))]
    pub duration: Duration,
    /// Unmeasured warm-up seconds before the measured period.
    #[arg(long = "warmup-secs", value_name = "WARMUP_SECS", default_value = "1", value_parser = secs(0, 600))]
    pub warmup: Duration,
    /// Rows per request (input shape [rows, 256]); at most the model's max_batch_size.
    #[arg(long, default_value_t = 1, value_parser = count(1, MAX_ROWS))]
    pub rows: usize,
    /// Send the input as binary tensor data (Inference-Header-Content-Length) and ask for
    /// binary outputs, instead of JSON arrays.
    #[arg(long)]
    pub binary: bool,
    /// Seconds to wait for one answer before counting it as a transport error.
    #[arg(long = "timeout-secs", value_name = "TIMEOUT_SECS", default_value = "30", value_parser = secs(1, 600))]
    pub request_timeout: Duration,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// The command line's defaults, quiet.
impl Default for RestOptions {
    fn default() -> Self {
        RestOptions {
            quiet: true,
            ..crate::cli::defaults()
        }
    }
}

impl RestOptions {
    /// The inference endpoint, after checking every bound and that the URL is loopback.
    pub fn endpoint(&self) -> anyhow::Result<Url> {
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            bail!(
                "concurrency must be 1..={MAX_CONCURRENCY}, got {}",
                self.concurrency
            );
        }
        check_duration(self.duration, MAX_DURATION)?;
        if self.warmup > MAX_DURATION {
            bail!("warm-up must be at most {}s", MAX_DURATION.as_secs());
        }
        if self.rows == 0 || self.rows > MAX_ROWS {
            bail!("rows must be 1..={MAX_ROWS}, got {}", self.rows);
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(600) {
            bail!("request timeout must be more than 0 and at most 600s");
        }
        check_model_name(&self.model)?;
        let base = check_loopback(&self.url)?;
        base.join(&format!("v2/models/{}/infer", self.model))
            .with_context(|| format!("cannot build the inference URL from {base}"))
    }
}

/// A measured period of more than 0 and at most `max`, as every load loop takes it.
pub fn check_duration(duration: Duration, max: Duration) -> anyhow::Result<()> {
    if duration.is_zero() || duration > max {
        bail!(
            "duration must be more than 0 and at most {}s",
            max.as_secs()
        );
    }
    Ok(())
}

/// A model name as the server's URLs take it: letters, digits, '_', '-', '.'.
pub fn check_model_name(model: &str) -> anyhow::Result<()> {
    if model.is_empty()
        || !model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        bail!("model name '{model}' must be non-empty and use only letters, digits, '_', '-', '.'");
    }
    Ok(())
}

/// Parses a server base URL and refuses anything but plain HTTP to a loopback IP address:
/// this tool generates load and must never point it at another machine.
pub fn check_loopback(url: &str) -> anyhow::Result<Url> {
    let mut parsed = Url::parse(url)
        .with_context(|| format!("'{url}' is not a URL (expected http://127.0.0.1:PORT)"))?;
    if parsed.scheme() != "http" {
        bail!("'{url}': only plain http:// to a loopback address is supported");
    }
    // `host_str` gives IPv6 literals in brackets; a domain name does not parse as an address.
    let host = parsed.host_str().unwrap_or("");
    let loopback = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!(
            "refusing to send load to '{url}': only loopback IP addresses (127.0.0.0/8, [::1]) are allowed; \
             use e.g. http://127.0.0.1:8080 (host names, even localhost, are not resolved)"
        );
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty() {
        bail!("'{url}': give the server's base URL only, e.g. http://127.0.0.1:8080");
    }
    if !parsed.path().ends_with('/') {
        let path = format!("{}/", parsed.path());
        parsed.set_path(&path);
    }
    Ok(parsed)
}
