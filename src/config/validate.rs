//! The rules a key's type cannot say, applied once the layers are merged (and, for floats,
//! before: NaN and infinity have no JSON form, so the merge would read them as "unset"):
//! lower bounds (raised), upper bounds (refused: values near `u64::MAX` overflow the
//! `Instant` and `Duration` arithmetic they reach), secrets trimmed and checked, the log
//! filter parsed, and config-file errors told without quoting a secret.

use std::path::{Path, PathBuf};

use super::{Config, SECRET_KEYS};

/// Longest duration a key may set: beyond it a value is a unit mix-up or a templated "max",
/// not a wish, and near `u64::MAX` it panics where it is added to an `Instant`.
pub const MAX_DURATION_SECS: u64 = 86_400;
/// Longest retention of finished batch jobs: ten years, far from any overflow.
pub const MAX_JOBS_RETENTION_SECS: u64 = 3650 * 86_400;
/// Most HTTP threads a listener may start: each is an OS thread with its own event loop, and
/// a typo (an extra zero) would start threads until the OS refuses, then panic.
pub const MAX_WORKERS: usize = 1024;
/// Registry polls: at least this often (below it the registry is hammered) ...
pub const MIN_POLL_SECS: f64 = 0.1;
/// ... and at most this far apart.
pub const MAX_POLL_SECS: f64 = MAX_DURATION_SECS as f64;

/// A configuration that cannot be run, naming the key (and, for the file, the line).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `error`, not `source`: the message already ends with it, and `{:#}` would say it twice.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A TOML error, told with its line but never with a secret's value.
    #[error("config file {}: {position}{message}{snippet}", path.display())]
    File {
        path: PathBuf,
        position: String,
        message: String,
        snippet: String,
    },
    #[error("{key} = {value} is over its maximum of {max}")]
    TooLarge {
        key: &'static str,
        value: u64,
        max: String,
    },
    #[error("{key} must be a finite number of seconds in {MIN_POLL_SECS}..={MAX_POLL_SECS}, got {value}")]
    PollOutOfRange { key: &'static str, value: f64 },
    /// Two keys that go together, or exclude each other.
    #[error("{0}")]
    Rule(&'static str),
    /// The value itself is never part of the message.
    #[error("{key} {problem}")]
    Secret {
        key: &'static str,
        problem: &'static str,
    },
    #[error("cannot read admin token file {}: {error}", path.display())]
    SecretFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("admin token file {} is empty", path.display())]
    EmptySecretFile { path: PathBuf },
    #[error("log filter '{directive}' is not a valid directive ({reason}); write `RUST_LOG` syntax, e.g. `info` or `info,streamserve=debug`")]
    LogFilter { directive: String, reason: String },
    #[error("log is empty: no line would be logged (not even \"streamserve listening\"); use `error` for the fewest lines")]
    LogEmpty,
}

/// A TOML error on `text`, the file at `path`: toml's message and position, and the line
/// it is on, with the value cut out unless the line's key is a known one that is no secret.
/// toml's own rendering quotes the line whole, and the error goes to stderr, which a
/// container's log ships to a log service: a stray comma after `admin_token = "..."`, or a
/// misspelt `admin_tokn`, would publish the token.
pub fn file_error(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let mut message = error.message().trim().to_string();
    let (mut position, mut snippet) = (String::new(), String::new());
    if let Some(span) = error.span() {
        let start = floor_char_boundary(text, span.start.min(text.len()));
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line_no = text[..start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        position = format!("line {line_no}, column {column}: ");
        let line = text[line_start..line_end].trim_end_matches('\r');
        let (shown, value) = shown_line(line);
        if let Some(value) = value {
            message = scrub(&message, value);
        }
        if !shown.is_empty() {
            snippet = format!("\n  {line_no} | {shown}");
        }
    }
    ConfigError::File {
        path: path.to_path_buf(),
        position,
        message,
        snippet,
    }
}

/// The line as an error may show it, and the value cut from it (to be cut from toml's message
/// too), if one was.
fn shown_line(line: &str) -> (String, Option<&str>) {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return (String::new(), None);
    }
    // A table header of bare names (`[server]`, `[[admin_token]]`) holds no value: shown
    // whole, as a misspelt key's name is, so that a misplaced section names itself instead of
    // reading "unknown field `<redacted>`".
    let header = trimmed.trim_start_matches('[').trim_end_matches(']');
    if trimmed.starts_with('[') && header.split('.').all(|name| is_key_like(name.trim())) {
        return (trimmed.to_string(), None);
    }
    let (key, value) = match trimmed.strip_prefix('[') {
        Some(header) => (header.trim_start_matches('[').split(']').next(), None),
        None => match trimmed.split_once('=') {
            Some((key, value)) => (Some(key), Some(value)),
            None => (None, Some(trimmed)),
        },
    };
    let key = key.map(|k| {
        k.trim()
            .trim_matches(['"', '\''])
            .split('.')
            .next()
            .unwrap_or("")
    });
    match (key, value) {
        // A secret's name further on (an inline table) makes the line a secret's too.
        (Some(key), _) if is_plain_key(key) && !SECRET_KEYS.iter().any(|k| trimmed.contains(k)) => {
            (trimmed.to_string(), None)
        }
        (Some(key), Some(value)) if is_key_like(key) => {
            (format!("{} = <redacted>", key.trim()), Some(value))
        }
        (_, value) => ("<redacted>".to_string(), value.or(Some(trimmed))),
    }
}

/// A key of the file whose value may be shown: known, and no secret.
fn is_plain_key(key: &str) -> bool {
    if SECRET_KEYS.contains(&key) {
        return false;
    }
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(keys)) => keys.contains_key(key),
        _ => false,
    }
}

/// A bare TOML key (shown even when unknown: a misspelt key's name is what the reader needs).
fn is_key_like(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `message` with every piece of `value` that could be a secret (four characters or more)
/// replaced: toml's messages quote the value they refuse (`invalid type: integer `123...``).
fn scrub(message: &str, value: &str) -> String {
    let mut out = message.to_string();
    let mut pieces: Vec<&str> = value
        .split(|c: char| c.is_whitespace() || "\"'`,[]{}=".contains(c))
        .filter(|p| p.chars().count() >= 4)
        .collect();
    // Longest first, so that a piece inside a longer one does not leave the rest behind.
    pieces.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for piece in pieces {
        out = out.replace(piece, "<redacted>");
    }
    out
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// `registry_poll_secs` as a layer sets it, checked before the layers are merged: NaN and
/// infinity would become JSON null there, which reads as "unset".
pub fn check_poll_secs(value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && (MIN_POLL_SECS..=MAX_POLL_SECS).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::PollOutOfRange {
            key: "registry_poll_secs",
            value,
        })
    }
}

/// A secret as it may come from the environment (`$(cat file; echo)`, a Kubernetes secret
/// made with `--from-file`): trimmed as the file form is, and refused if nothing is left or
/// if it holds a control character, which no `Authorization` header can carry.
pub fn secret(key: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ConfigError::Secret {
            key,
            problem: "is empty or only whitespace; unset it instead (or give it a value)",
        });
    }
    if value.chars().any(char::is_control) {
        return Err(ConfigError::Secret {
            key,
            problem: "holds a control character (a newline or tab inside it?); no request header can carry it",
        });
    }
    Ok(value.to_string())
}

/// The log filter, parsed as the logger will parse it: the logger falls back to `info` on a
/// bad directive without a word, so `streamserve=debugg` would silently log at `info`, and an
/// empty filter logs nothing at all.
pub fn check_log_filter(filter: &str) -> Result<(), ConfigError> {
    if filter.split(',').all(|d| d.trim().is_empty()) {
        return Err(ConfigError::LogEmpty);
    }
    // One directive at a time, split as the filter's parser splits them, to name the bad one.
    for directive in filter.split(',').filter(|d| !d.is_empty()) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(directive) {
            return Err(ConfigError::LogFilter {
                directive: directive.to_string(),
                reason: e.to_string(),
            });
        }
    }
    Ok(())
}

impl Config {
    /// The per-key rules that a type cannot say: lower bounds, upper bounds, secrets, the
    /// log filter, and the token file read.
    pub(super) fn normalise(mut self) -> Result<Config, ConfigError> {
        self.http_workers = self.http_workers.max(1);
        self.stream_workers = self.stream_workers.max(1);
        self.stream_idle_secs = self.stream_idle_secs.max(1);
        self.body_timeout_secs = self.body_timeout_secs.max(1);
        self.max_body_memory_mb = self.max_body_memory_mb.max(1);
        self.admission_target_ms = self.admission_target_ms.max(1);
        self.drift_reference_rows = self.drift_reference_rows.max(1);
        self.drift_window_rows = self.drift_window_rows.max(1);
        self.check_maximums()?;
        check_poll_secs(self.registry_poll_secs)?;
        check_log_filter(&self.log)?;
        self.registry = self.registry.take().filter(|r| !r.trim().is_empty());
        if self.grpc_tls_cert.is_some() != self.grpc_tls_key.is_some() {
            return Err(ConfigError::Rule(
                "grpc_tls_cert and grpc_tls_key go together: set both (TLS) or neither (h2c)",
            ));
        }
        if self.stream_token_keys.is_some() && self.stream_token_key.is_some() {
            return Err(ConfigError::Rule(
                "both stream_token_keys and stream_token_key are set; set one of them",
            ));
        }
        if let Some(key) = &self.stream_token_key {
            self.stream_token_key = Some(secret("stream_token_key", key)?);
        }
        if let Some(path) = &self.admin_token_file {
            if self.admin_token.is_some() {
                return Err(ConfigError::Rule(
                    "both admin_token and admin_token_file are set; set one of them",
                ));
            }
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::SecretFile {
                path: path.clone(),
                error,
            })?;
            if text.trim().is_empty() {
                return Err(ConfigError::EmptySecretFile { path: path.clone() });
            }
            self.admin_token = Some(text);
        }
        if let Some(token) = &self.admin_token {
            self.admin_token = Some(secret("admin_token", token)?);
        }
        Ok(self)
    }

    fn check_maximums(&self) -> Result<(), ConfigError> {
        let day_ms = MAX_DURATION_SECS * 1000;
        let durations = [
            (
                "stream_resume_secs",
                self.stream_resume_secs,
                MAX_DURATION_SECS,
            ),
            ("stream_idle_secs", self.stream_idle_secs, MAX_DURATION_SECS),
            ("drain_secs", self.drain_secs, MAX_DURATION_SECS),
            ("keep_alive_secs", self.keep_alive_secs, MAX_DURATION_SECS),
            (
                "body_timeout_secs",
                self.body_timeout_secs,
                MAX_DURATION_SECS,
            ),
            (
                "registry_wait_secs",
                self.registry_wait_secs,
                MAX_DURATION_SECS,
            ),
            ("stream_checkpoint_ms", self.stream_checkpoint_ms, day_ms),
            ("admission_target_ms", self.admission_target_ms, day_ms),
        ];
        for (key, value, max) in durations {
            if value > max {
                return Err(ConfigError::TooLarge {
                    key,
                    value,
                    max: format!("{max} (1 day)"),
                });
            }
        }
        if self.jobs_retention_secs > MAX_JOBS_RETENTION_SECS {
            return Err(ConfigError::TooLarge {
                key: "jobs_retention_secs",
                value: self.jobs_retention_secs,
                max: format!("{MAX_JOBS_RETENTION_SECS} (3650 days)"),
            });
        }
        for (key, value) in [
            ("http_workers", self.http_workers),
            ("stream_workers", self.stream_workers),
        ] {
            if value > MAX_WORKERS {
                return Err(ConfigError::TooLarge {
                    key,
                    value: value as u64,
                    max: format!("{MAX_WORKERS} threads"),
                });
            }
        }
        Ok(())
    }
}
