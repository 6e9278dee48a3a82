//! The `streamserve` command line: its subcommands ([`Cli`]), and `streamserve admin ...`, the
//! admin API from the command line, against a local or deployed server (`--url`,
//! `STREAMSERVE_URL`; token from `--token` or `STREAMSERVE_ADMIN_TOKEN`). The model registry's
//! commands are in [`registry`].

pub mod jobs;
pub mod profile;
pub mod registry;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::api::admin::{MAX_FAULT_COUNT, MAX_FAULT_MS, MAX_STEP_SECS};

#[derive(Debug, Parser)]
#[command(
    name = "streamserve",
    version,
    about = "Serve ONNX models over the Open Inference Protocol"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the server on the models of a model directory.
    Serve(Box<crate::config::ServeArgs>),
    /// Verify a model directory's manifest and hashes, then print what it holds.
    CheckModels(crate::config::CheckArgs),
    /// Operate a running server through its admin API (load, unload, deploy, rollback, ...).
    Admin(AdminArgs),
    /// Make API keys for `--api-keys` files.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The model registry: publish versions, deploy them to the fleet, watch the fleet.
    Registry(registry::RegistryArgs),
    /// Profile a model version on a reference data set (`profile.json`, what drift is measured
    /// against), and optionally make its golden-input probe (`probe.json`).
    Profile(profile::ProfileArgs),
    /// Batch prediction jobs on a running server: submit, status (`--wait`), list, cancel.
    Jobs(jobs::JobsArgs),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// A new key for `--stream-token-keys`: 256 random bits, one line. Put the same file on
    /// every instance. To rotate without dropping streams, in three roll-outs: add the new key
    /// as the second line on every instance (it verifies, the old key still signs); once every
    /// instance has it, move it to the first line (it signs); once every instance signs with
    /// it, wait `--stream-resume-secs` and remove the old key. A new key first on one instance
    /// before all have it signs tokens the others refuse.
    NewStreamKey,
    /// A new random key: prints the key (once: the file keeps only its hash) and the entry to
    /// add to the keys file.
    New {
        /// The key's name, as logs and metrics show it.
        name: String,
        /// Models it may call: `*`, `name` or `name:version`, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        models: Vec<String>,
        /// The server's `--api-key-secret-file`: the entry then holds the key's HMAC-SHA256
        /// under that secret instead of its SHA-256.
        #[arg(long, env = "STREAMSERVE_API_KEY_SECRET_FILE")]
        secret_file: Option<std::path::PathBuf>,
    },
}

/// `streamserve keys new`: the key on stdout's first line, the file entry after it.
pub fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::NewStreamKey => {
            let key = crate::stream::checkpoint::new_key().map_err(anyhow::Error::msg)?;
            println!("{key}");
            Ok(())
        }
        KeysCommand::New {
            name,
            models,
            secret_file,
        } => {
            use crate::access::keys;
            let key = keys::new_key().map_err(anyhow::Error::msg)?;
            let models: Vec<String> = models.iter().map(|m| format!("{m:?}")).collect();
            let (field, hash) = match &secret_file {
                Some(path) => {
                    let secret = keys::read_secret(path).map_err(anyhow::Error::msg)?;
                    ("hmac_sha256", keys::keyed_hash(&secret, &key))
                }
                None => ("sha256", keys::hash(&key)),
            };
            let entry = format!(
                "[[keys]]\nname = {name:?}\n{field} = \"{}\"\nmodels = [{}]\n",
                hex::encode(hash),
                models.join(", ")
            );
            // The entry must parse as the server will read it.
            keys::parse(&entry, secret_file.is_some()).map_err(anyhow::Error::msg)?;
            println!("{key}");
            println!(
                "\n# Add to the API keys file (the key above is not stored anywhere):\n{entry}"
            );
            Ok(())
        }
    }
}

#[derive(Args)]
pub struct AdminArgs {
    /// Base URL of the server.
    #[arg(long, env = "STREAMSERVE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The server's admin token.
    #[arg(long, env = "STREAMSERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The token never prints.
impl std::fmt::Debug for AdminArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminArgs")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("command", &self.command)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Every model version with its state and router.
    Models,
    /// Load a version now.
    Load {
        model: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Drain and free a version (it loads again on demand).
    Unload {
        model: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Make VERSION the default of MODEL.
    Deploy {
        model: String,
        version: String,
        #[arg(long, value_enum, default_value = "blue-green")]
        strategy: StrategyArg,
        /// Canary traffic shares in percent: strictly increasing, each in 1..=100, ending at
        /// 100, at most 20 (a rolling update makes its own, one replica's share per step).
        #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
        steps: Vec<u32>,
        /// Seconds per canary or rolling step, in 1..=3600.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_STEP_SECS))]
        step_secs: u64,
        /// Skip the request of zeros sent to the new version before it takes traffic.
        #[arg(long)]
        no_smoke_test: bool,
    },
    /// Abort a running canary or rolling update, or restore the previous default.
    Rollback { model: String },
    /// Running rollouts and the last rollback reasons.
    Rollouts,
    /// What this server sees of its model registry: reachable or not, each model's desired
    /// state and its routing here, its last report.
    Registry,
    /// Inject a fault into a model's workers (drills and tests).
    Fault {
        model: String,
        #[arg(long, value_enum)]
        kind: FaultKind,
        /// Milliseconds of a hang or slow-down, in 1..=600000.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=MAX_FAULT_MS))]
        ms: u64,
        /// One replica (0-based); all of them if not given.
        #[arg(long)]
        replica: Option<usize>,
        /// Batches the fault hits on each replica, in 1..=1000.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_FAULT_COUNT))]
        count: u64,
        #[arg(long)]
        version: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StrategyArg {
    BlueGreen,
    Canary,
    Rolling,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FaultKind {
    Panic,
    Hang,
    Slow,
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let (method, path, body): (&str, String, Option<Value>) = match args.command {
        AdminCommand::Models => ("GET", "/admin/models".into(), None),
        AdminCommand::Rollouts => ("GET", "/admin/rollouts".into(), None),
        AdminCommand::Registry => ("GET", "/admin/registry".into(), None),
        AdminCommand::Load { model, version } => (
            "POST",
            format!("/admin/models/{model}/load"),
            Some(json!({"version": version})),
        ),
        AdminCommand::Unload { model, version } => (
            "POST",
            format!("/admin/models/{model}/unload"),
            Some(json!({"version": version})),
        ),
        AdminCommand::Deploy {
            model,
            version,
            strategy,
            steps,
            step_secs,
            no_smoke_test,
        } => {
            let strategy = match strategy {
                StrategyArg::BlueGreen => "blue_green",
                StrategyArg::Canary => "canary",
                StrategyArg::Rolling => "rolling",
            };
            let body = json!({"version": version, "strategy": strategy, "steps": steps, "step_secs": step_secs, "smoke_test": !no_smoke_test});
            ("POST", format!("/admin/models/{model}/deploy"), Some(body))
        }
        AdminCommand::Rollback { model } => (
            "POST",
            format!("/admin/models/{model}/rollback"),
            Some(json!({})),
        ),
        AdminCommand::Fault {
            model,
            kind,
            ms,
            replica,
            count,
            version,
        } => {
            let fault = match kind {
                FaultKind::Panic => json!({"kind": "panic"}),
                FaultKind::Hang => json!({"kind": "hang", "ms": ms}),
                FaultKind::Slow => json!({"kind": "slow", "ms": ms}),
            };
            let body =
                json!({"fault": fault, "replica": replica, "count": count, "version": version});
            ("POST", format!("/admin/models/{model}/faults"), Some(body))
        }
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    // Trimmed as the server trims its own (a token from a file or a secret often ends in a
    // newline, which a header cannot carry).
    let auth = format!("Bearer {}", args.token.trim());
    let response = match body {
        None => agent.get(&url).header("Authorization", &auth).call(),
        Some(body) => agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(body),
    };
    let mut response = response.map_err(|e| anyhow::anyhow!("{method} {url}: {e}"))?;
    let status = response.status();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let pretty = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if status.is_success() {
        println!("{pretty}");
        Ok(())
    } else {
        anyhow::bail!("{method} {url}: {status}\n{pretty}")
    }
}
