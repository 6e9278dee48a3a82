//! What a run is asked to do: `loadgen streams`' options, the results mode, and the checks
//! of every bound before any stream opens.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::builder::TypedValueParser as _;

use super::{Audio, MAX_DURATION, MAX_STREAMS};
use crate::cli::{count, secs};
use crate::rest::{check_duration, check_loopback, check_model_name};

/// Which results a stream asks for (`results` in the start message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultsMode {
    /// A `vad` message per chunk (timed) plus events.
    All,
    /// Speech events and the summary only: nothing per chunk to time.
    Events,
}

impl ResultsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultsMode::All => "all",
            ResultsMode::Events => "events",
        }
    }
}

impl std::str::FromStr for ResultsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(ResultsMode::All),
            "events" => Ok(ResultsMode::Events),
            other => Err(format!("results must be 'all' or 'events', not '{other}'")),
        }
    }
}

/// `loadgen streams`' options (the audio aside: `--wav` is read into `audio`).
#[derive(Clone, Debug, clap::Args)]
pub struct StreamOptions {
    /// Server base URL; loopback IP addresses only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model to stream to; it must declare a `stream` in the manifest (VAD or keyword).
    #[arg(long, default_value = "silero_vad")]
    pub model: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 100, value_parser = count(1, MAX_STREAMS))]
    pub streams: usize,
    /// Measured seconds (after the ramp).
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "10", value_parser = secs(1, 3600))]
    pub duration: Duration,
    /// Seconds over which the streams open, evenly spread; not measured.
    #[arg(long = "ramp-secs", value_name = "RAMP_SECS", default_value = "2", value_parser = secs(0, 600))]
    pub ramp: Duration,
    /// Audio seconds sent per wall-clock second (1.0 = real time).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Milliseconds of audio per binary frame.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub frame_ms: u32,
    /// `all`: a vad result per chunk (timed); `events`: speech events only (nothing to time).
    #[arg(long, default_value = "all")]
    pub results: ResultsMode,
    /// Keyword streams: leave out the model's gate (`"gate": false` in `start`), so that every
    /// stage runs on all the audio.
    #[arg(long)]
    pub no_gate: bool,
    #[arg(skip)]
    pub audio: Arc<Audio>,
    /// A sender further behind its real-time schedule than this makes its stream late.
    #[arg(long = "late-ms", value_name = "LATE_MS", default_value = "100",
          value_parser = clap::value_parser!(u64).range(1..=60000).map(Duration::from_millis))]
    pub late_threshold: Duration,
    /// After `end`, how long a stream waits for its summary and close.
    #[arg(skip = Duration::from_secs(15))]
    pub end_timeout: Duration,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Prefix of the progress lines.
    #[arg(skip = "streams".to_string())]
    pub label: String,
}

impl StreamOptions {
    /// The command line's defaults for a server at `url`, with the given audio, quiet.
    pub fn new(url: impl Into<String>, audio: Arc<Audio>) -> StreamOptions {
        StreamOptions {
            url: url.into(),
            audio,
            quiet: true,
            ..crate::cli::defaults()
        }
    }

    /// The stream endpoint (`ws://…/v1/streams/{model}`), after checking every bound and that
    /// the URL is loopback.
    pub fn endpoint(&self) -> anyhow::Result<String> {
        if self.streams == 0 || self.streams > MAX_STREAMS {
            bail!("streams must be 1..={MAX_STREAMS}, got {}", self.streams);
        }
        check_duration(self.duration, MAX_DURATION)?;
        if self.ramp > MAX_DURATION {
            bail!("ramp must be at most {}s", MAX_DURATION.as_secs());
        }
        if !(self.speed.is_finite() && (0.1..=100.0).contains(&self.speed)) {
            bail!("speed must be 0.1..=100, got {}", self.speed);
        }
        if self.frame_ms == 0 || self.frame_ms > 1000 {
            bail!("frame_ms must be 1..=1000, got {}", self.frame_ms);
        }
        if self.end_timeout.is_zero() || self.end_timeout > Duration::from_secs(600) {
            bail!("end timeout must be more than 0 and at most 600s");
        }
        check_model_name(&self.model)?;
        let base = check_loopback(&self.url)?;
        let url = base
            .join(&format!("v1/streams/{}", self.model))
            .with_context(|| format!("cannot build the stream URL from {base}"))?;
        Ok(url.as_str().replacen("http://", "ws://", 1))
    }

    pub(super) fn frame_samples(&self) -> usize {
        (self.audio.sample_rate as usize * self.frame_ms as usize / 1000).max(1)
    }

    /// Wall-clock time between frames.
    pub(super) fn frame_period(&self) -> Duration {
        Duration::from_secs_f64(self.frame_ms as f64 / 1000.0 / self.speed)
    }
}
