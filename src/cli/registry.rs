//! `streamserve registry ...`: the model registry from the command line. Publish versions
//! (`push`, `seed`), see them (`list`), move the fleet (`deploy`, `rollback`) and watch it
//! (`status`). The work is `registry::ops`; this file parses, prints, and reads the model
//! file's interface with ONNX Runtime for `push`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::registry::fleet::{self, DeployRequest};
use crate::registry::ops::{self, Push, Status};
use crate::registry::records::{Desired, Interface, Strategy, TensorDecl};
use crate::registry::{now_ms, rfc3339, whoami, Store};
use crate::untrusted::Untrusted;

#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// The registry: `s3://bucket/prefix` (endpoint and keys from `AWS_ENDPOINT_URL`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), `gs://`, `az://`,
    /// `file:///dir` or a directory.
    #[arg(long, env = "STREAMSERVE_REGISTRY", global = true)]
    pub registry: Option<String>,
    #[command(subcommand)]
    pub command: RegistryCommand,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Publish a model version: computes its sha256, reads its interface with ONNX Runtime,
    /// records its serving settings, who and when; refuses to overwrite a version.
    Push {
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// The ONNX model file.
        file: PathBuf,
        /// Serving settings: a TOML file with the keys of a `[[models]]` entry of
        /// `models.toml` (replicas, max_batch_size, slo_ms, fallback, inputs, ...), without
        /// name, version, file and sha256.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        description: Option<String>,
        /// Where the model came from: training run, commit, data set.
        #[arg(long)]
        source: Option<String>,
        /// Do not open the model with ONNX Runtime (no interface is recorded).
        #[arg(long)]
        no_inspect: bool,
        /// Path of libonnxruntime (else as `serve` finds it).
        #[arg(long, env = "ORT_DYLIB_PATH")]
        ort_dylib: Option<PathBuf>,
    },
    /// Publish every version of a model directory (`models.toml`) and give each model without
    /// a default its manifest default.
    Seed {
        #[arg(long, env = "STREAMSERVE_MODELS", default_value = "models")]
        models: PathBuf,
    },
    /// Models, their versions and their desired state.
    List {
        /// Only this model.
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Start a fleet-wide rollout of NAME to VERSION (a model's first version becomes its
    /// default at once).
    Deploy {
        name: String,
        version: String,
        #[arg(long, value_enum, default_value = "blue_green")]
        strategy: StrategyArg,
        /// Canary shares of the whole service's traffic, in percent: strictly increasing,
        /// ending at 100.
        #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
        steps: Vec<u32>,
        /// Seconds per canary step, timed from the rollout's start on every instance alike.
        #[arg(long, default_value_t = 30)]
        step_secs: u64,
        /// Rolling: seconds each instance must stay healthy on the new version before the
        /// next one switches.
        #[arg(long, default_value_t = 30)]
        hold_secs: u64,
        /// Skip the request of zeros each instance sends the new version before it serves.
        #[arg(long)]
        no_smoke_test: bool,
    },
    /// Stop NAME's rollout (every instance returns to the previous version), or put back the
    /// version that NAME's last completed rollout replaced (or `--to VERSION`).
    Rollback {
        name: String,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value = "rolled back by an operator")]
        reason: String,
    },
    /// Every instance (live or gone), what it serves, the rollouts in progress and each
    /// model's recent history.
    Status {
        #[arg(long)]
        json: bool,
        /// History entries shown per model.
        #[arg(long, default_value_t = 5)]
        history: usize,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StrategyArg {
    #[value(name = "blue_green", alias = "blue-green")]
    BlueGreen,
    Canary,
    Rolling,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Strategy {
        match s {
            StrategyArg::BlueGreen => Strategy::BlueGreen,
            StrategyArg::Canary => Strategy::Canary,
            StrategyArg::Rolling => Strategy::Rolling,
        }
    }
}

pub fn run(args: RegistryArgs) -> anyhow::Result<()> {
    let uri = args.registry.ok_or_else(|| {
        anyhow::anyhow!("which registry? Give --registry URI (or STREAMSERVE_REGISTRY)")
    })?;
    // Opening a local registry creates its directory, as `push` and `seed` into a new one
    // need; a command that only reads or changes what is there would otherwise create an
    // empty registry at a misspelt path and answer "(no models)".
    let publishes = matches!(
        args.command,
        RegistryCommand::Push { .. } | RegistryCommand::Seed { .. }
    );
    if let Some(dir) = crate::registry::store::local_dir(&uri).filter(|dir| !dir.is_dir()) {
        if !publishes {
            anyhow::bail!(
                "registry directory {} does not exist (`push` or `seed` creates it)",
                dir.display()
            );
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = runtime.block_on(async move {
        let store = Store::open(&uri)?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        command(&store, args.command, &mut out).await?;
        out.flush()?;
        Ok::<_, anyhow::Error>(())
    });
    match done {
        // The reader went away (`registry list | head`): what it wanted it has.
        Err(e) if is_broken_pipe(&e) => Ok(()),
        done => done,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Text from the registry (names, reasons, ids other processes wrote) escaped and capped for
/// the operator's terminal: a report may hold terminal escapes.
fn u(text: &str) -> String {
    Untrusted(text).to_string()
}

/// What a command could not read on the way (bad keys, unreadable reports), on stderr.
fn warn(warnings: &[String]) {
    for warning in warnings {
        eprintln!("warning: {}", u(warning));
    }
}

async fn command(
    store: &Store,
    command: RegistryCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Push {
            name,
            version,
            file,
            config,
            description,
            source,
            no_inspect,
            ort_dylib,
        } => {
            let mut settings = match &config {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                    toml::from_str::<toml::Table>(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                }
                None => toml::Table::new(),
            };
            if let Some(description) = description {
                settings.insert("description".into(), description.into());
            }
            if let Some(source) = source {
                settings.insert("source".into(), source.into());
            }
            let interface = if no_inspect {
                None
            } else {
                Some(inspect(ort_dylib.as_deref(), &file)?)
            };
            let record = ops::push(
                store,
                Push {
                    name,
                    version,
                    file,
                    settings,
                    interface,
                    by: whoami(),
                    expect_sha256: None,
                },
            )
            .await?;
            writeln!(
                out,
                "pushed {}:{} ({} bytes, sha256 {}) to {}",
                record.name,
                record.version,
                record.size,
                record.sha256,
                store.uri()
            )?;
        }
        RegistryCommand::Seed { models } => {
            let seeded = ops::seed(store, &models, &whoami()).await?;
            for label in &seeded.pushed {
                writeln!(out, "pushed   {label}")?;
            }
            for label in &seeded.present {
                writeln!(out, "present  {label}")?;
            }
            for (name, version) in &seeded.defaults {
                writeln!(out, "default  {name} = {version}")?;
            }
        }
        RegistryCommand::List { name, json } => {
            let listings = ops::list(store, name.as_deref()).await?;
            warn(&listings.warnings);
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&listings.models)?)?;
            } else {
                print_listings(out, &listings.models)?;
            }
        }
        RegistryCommand::Deploy {
            name,
            version,
            strategy,
            steps,
            step_secs,
            hold_secs,
            no_smoke_test,
        } => {
            let request = DeployRequest {
                version,
                strategy: strategy.into(),
                steps,
                step_secs,
                hold_secs,
                smoke_test: !no_smoke_test,
                by: whoami(),
                id: uuid::Uuid::new_v4().simple().to_string(),
            };
            let desired = ops::deploy(store, &name, request).await?;
            writeln!(out, "{}", describe_desired(&desired, now_ms()))?;
        }
        RegistryCommand::Rollback { name, to, reason } => {
            let desired = ops::rollback(store, &name, to.as_deref(), &whoami(), &reason).await?;
            writeln!(out, "{}", describe_desired(&desired, now_ms()))?;
        }
        RegistryCommand::Status { json, history } => {
            let status = ops::status(store).await?;
            warn(&status.warnings);
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
            } else {
                print_status(out, &status, history)?;
            }
        }
    }
    Ok(())
}

/// The model's interface as ONNX Runtime reads it (and proof that it loads).
fn inspect(ort: Option<&std::path::Path>, file: &std::path::Path) -> anyhow::Result<Interface> {
    let (inputs, outputs) = crate::runtime::inspect(ort, file).map_err(|e| {
        anyhow::anyhow!(
            "cannot open {} with ONNX Runtime: {e} (--no-inspect publishes it unread)",
            file.display()
        )
    })?;
    let decls = |specs: Vec<crate::runtime::TensorSpec>| {
        specs
            .into_iter()
            .map(|s| TensorDecl {
                name: s.name,
                datatype: s.datatype.as_str().to_string(),
                shape: s.shape,
            })
            .collect()
    };
    Ok(Interface {
        inputs: decls(inputs),
        outputs: decls(outputs),
    })
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    let secs = now_ms.saturating_sub(at_ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// One line for a model's desired state: its default and the rollout in progress.
fn describe_desired(desired: &Desired, now_ms: u64) -> String {
    let default = u(desired.default.as_deref().unwrap_or("none"));
    let Some(r) = &desired.rollout else {
        return format!("{}: default {default}", u(&desired.model));
    };
    let detail = match r.strategy {
        Strategy::Canary => {
            let step = fleet::canary_step(r, now_ms);
            let percent = r
                .steps
                .get(step.min(r.steps.len().saturating_sub(1)))
                .copied();
            format!(
                ", step {}/{} ({}%), {} s per step",
                (step + 1).min(r.steps.len()),
                r.steps.len(),
                percent.unwrap_or(100),
                r.step_secs
            )
        }
        Strategy::Rolling => format!(
            ", {} instance(s) switched, {} s hold",
            r.switched.len(),
            r.hold_secs
        ),
        Strategy::BlueGreen => String::new(),
    };
    format!(
        "{}: default {default}; {} rollout of {} from {}{detail}, started {} by {}",
        u(&desired.model),
        r.strategy.name(),
        u(&r.version),
        u(r.from.as_deref().unwrap_or("none")),
        ago(now_ms, r.started_at_ms),
        u(&r.started_by)
    )
}

fn print_listings(out: &mut dyn Write, listings: &[ops::ModelListing]) -> std::io::Result<()> {
    if listings.is_empty() {
        writeln!(out, "(no models)")?;
    }
    let now = now_ms();
    for listing in listings {
        match &listing.desired {
            Some(desired) => writeln!(out, "{}", describe_desired(desired, now))?,
            None => writeln!(out, "{}: no desired state (not deployed)", u(&listing.name))?,
        }
        writeln!(
            out,
            "  {:<10} {:<12} {:>10}  {:<20}  {:<24} DESCRIPTION",
            "VERSION", "SHA256", "BYTES", "PUSHED", "BY"
        )?;
        for v in &listing.versions {
            let description: String = u(&v.description).chars().take(60).collect();
            writeln!(
                out,
                "  {:<10} {:<12} {:>10}  {:<20}  {:<24} {description}",
                u(&v.version),
                &v.sha256[..12],
                v.size,
                rfc3339(v.pushed_at_ms),
                u(&v.pushed_by)
            )?;
        }
        for (version, reason) in &listing.broken {
            writeln!(out, "  {:<10} BROKEN: {}", u(version), u(reason))?;
        }
    }
    Ok(())
}

fn print_status(out: &mut dyn Write, status: &Status, history: usize) -> std::io::Result<()> {
    let now = status.now_ms;
    let live = status
        .instances
        .iter()
        .filter(|r| fleet::is_live(r, now))
        .count();
    writeln!(
        out,
        "registry {}: {live} live instance(s), {} gone",
        status.registry,
        status.instances.len() - live
    )?;
    for report in &status.instances {
        let state = if fleet::is_live(report, now) {
            "live"
        } else {
            "gone"
        };
        let serving: Vec<String> = report
            .models
            .iter()
            .map(|(name, m)| {
                let default = m.default.as_deref().unwrap_or("-");
                let label = m
                    .default
                    .as_ref()
                    .and_then(|v| m.versions.get(v))
                    .map_or("-", |v| v.state.as_str());
                let canary = m
                    .canary
                    .as_ref()
                    .map(|c| format!(" (+{} at {}%)", u(&c.version), c.percent))
                    .unwrap_or_default();
                format!("{}={} {}{canary}", u(name), u(default), u(label))
            })
            .collect();
        writeln!(
            out,
            "  {} [{state}, heartbeat {}{}{}]\n    {}",
            u(&report.id),
            ago(now, report.heartbeat_at_ms),
            report
                .url
                .as_ref()
                .map(|url| format!(", {}", u(url)))
                .unwrap_or_default(),
            report
                .registry_error
                .as_ref()
                .map(|e| format!(", registry error: {}", u(e)))
                .unwrap_or_default(),
            serving.join(", ")
        )?;
        if let Some(duplicate) = &report.duplicate {
            writeln!(out, "    warning: {}", u(duplicate))?;
        }
        for (name, m) in &report.models {
            for (version, reason) in &m.unavailable {
                writeln!(
                    out,
                    "    {}:{} unavailable: {}",
                    u(name),
                    u(version),
                    u(reason)
                )?;
            }
        }
    }
    for desired in &status.models {
        writeln!(out, "{}", describe_desired(desired, now))?;
        if let Some(rollout) = &desired.rollout {
            for report in status.instances.iter().filter(|r| fleet::is_live(r, now)) {
                let part = report
                    .models
                    .get(&desired.model)
                    .and_then(|m| m.rollout.as_ref())
                    .filter(|p| p.id == rollout.id);
                let text = match part {
                    None => "not reported yet".to_string(),
                    Some(p) => match &p.failed {
                        Some(reason) => format!("FAILED: {}", u(reason)),
                        None => {
                            let mut words =
                                vec![if p.prepared { "ready" } else { "loading" }.to_string()];
                            if let Some(step) = p.passed_step {
                                words.push(format!("passed step {}", step + 1));
                            }
                            if let Some(since) = p.healthy_since_ms {
                                words.push(format!("switched, healthy since {}", ago(now, since)));
                            }
                            words.join(", ")
                        }
                    },
                };
                writeln!(out, "    {}: {text}", u(&report.id))?;
            }
        }
        let shown = desired.history.len().saturating_sub(history);
        for event in &desired.history[shown..] {
            let from = event
                .from
                .as_ref()
                .map(|f| format!(" from {}", u(f)))
                .unwrap_or_default();
            let strategy = event
                .strategy
                .map(|s| format!(" ({})", s.name()))
                .unwrap_or_default();
            let reason = event
                .reason
                .as_ref()
                .map(|r| format!(": {}", u(r)))
                .unwrap_or_default();
            writeln!(
                out,
                "    {} {} {}{from}{strategy} by {}{reason}",
                rfc3339(event.at_ms),
                event.event.name(),
                u(&event.version),
                u(&event.by)
            )?;
        }
    }
    Ok(())
}
