//! `streamserve check-models`' arguments. Its model directory is found as `serve` finds its
//! own (flag, environment, config file, default), through the same layering, so that a check
//! passes or fails on the directory the server would load.

use std::path::PathBuf;

use clap::Args;

use super::{Config, ServeArgs};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// TOML config file, as `serve --config` reads it: its `models` names the directory.
    #[arg(long, env = "STREAMSERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model directory holding `models.toml`; wins over the config file's `models`
    /// [default: models].
    #[arg(long, env = "STREAMSERVE_MODELS")]
    pub models: Option<PathBuf>,
}

impl CheckArgs {
    /// The model directory `serve` would load with the same flags, environment and file.
    pub fn models_dir(&self) -> anyhow::Result<PathBuf> {
        let layers = ServeArgs {
            config: self.config.clone(),
            models: self.models.clone(),
            ..ServeArgs::default()
        };
        Ok(Config::layered(layers)?.models)
    }
}
