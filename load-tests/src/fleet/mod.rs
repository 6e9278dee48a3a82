//! The fleet drill (`loadgen fleet`): fleet-wide deployments of `mlp` under load, through a
//! real load balancer. It starts moto's S3-compatible server, seeds a registry in it (`mlp`
//! version 1 = the `mlp_small` file) and pushes one version per drill; starts N `streamserve
//! serve --registry s3://...` processes that follow the registry, and haproxy in front of them
//! (round robin, health-checked, each answer stamped `X-Served-By`); then, under a steady REST
//! load through haproxy, runs each drill from a converged fleet: a blue/green deploy, a canary,
//! a rolling update, and a canary of the slow `mlp_slow` that the fleet must roll back.
//!
//! Per drill it measures how long after `registry deploy` returned the whole fleet served the
//! new version (as the client saw it through haproxy, per instance, and as the registry's
//! history recorded it), every failed request, and the traffic share per version over time.
//! [`options`] holds the options and the drills, [`procs`] the processes, [`load`] the client, [`watch`] what is read from the
//! registry and `/proc` meanwhile, [`analysis`] the arithmetic and [`report`] the files written.

pub mod analysis;
pub mod balancer;
pub mod load;
pub mod options;
pub mod procs;
pub mod report;
pub mod watch;

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::manifest::{self, EntryChange};
use crate::sysinfo::wait_for_quiet;
use balancer::Haproxy;
pub use options::{Drill, FleetOptions};
use procs::{Instance, InstanceSetup, Registry, TempDir, S3};
use watch::{cpu_mark, cpu_share, instances_settled, model_history, outcome};

/// The plot written beside `report.md`.
pub const PLOT_FILE: &str = "fleet.svg";
/// The model every drill deploys.
pub const MODEL: &str = "mlp";

/// A version pushed for the drill.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pushed {
    pub version: String,
    pub file: String,
    pub note: String,
}

/// What happened in one drill, in seconds since the drill's start.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepRecord {
    pub drill: Drill,
    pub strategy: &'static str,
    pub from: String,
    pub to: String,
    pub deploy_command: String,
    pub deploy_output: String,
    /// The step's span starts here (the fleet steady on `from`)...
    pub begin_s: f64,
    pub deploy_started_s: f64,
    pub deploy_returned_s: f64,
    /// Its instances' reports showed them settled on the outcome here...
    pub reports_settled_s: f64,
    /// ...and the step's span ends here, after as long a steady period as it began with.
    pub end_s: f64,
}

/// Everything the drill measured.
pub struct Measured {
    pub pushed: Vec<Pushed>,
    pub instance_ids: Vec<String>,
    pub haproxy_version: String,
    pub haproxy_config: String,
    pub steps: Vec<StepRecord>,
    pub load_end_s: f64,
    pub answers: Vec<load::Answer>,
    /// The model's history as the registry ends it, with `at_s` (s since the drill's start).
    pub history: Vec<Value>,
    /// CPU cores per part over the load: (label, cores).
    pub cpu: Vec<(String, f64)>,
}

/// Runs the drill and writes its report.
pub fn run(options: &FleetOptions) -> anyhow::Result<report::FleetOutcome> {
    options.check()?;
    let bin = options.server.get()?;
    let haproxy_version = Haproxy::version()?;
    if !S3::python().is_file() {
        bail!("no .venv with moto's S3 server: run `bash scripts/setup.sh --fleet`");
    }
    let start = crate::report::Start::now(options.common.out.as_deref(), "fleet-mlp");
    std::fs::create_dir_all(&start.dir)
        .with_context(|| format!("cannot create {}", start.dir.display()))?;
    wait_for_quiet(crate::sysinfo::QUIET_CORES, options.common.quiet_wait);
    let runtime = crate::sysinfo::client_runtime(options.common.threads.get())?;
    let measured = drill(options, &bin, haproxy_version, &start.dir, &runtime)?;
    drop(runtime);
    report::write(options, &start, &measured)
}

/// Seconds since `t0`.
pub(crate) fn since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

fn epoch_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn drill(
    options: &FleetOptions,
    bin: &std::path::Path,
    haproxy_version: String,
    out: &std::path::Path,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Measured> {
    let work = TempDir::create("fleet")?;
    let models = work.sub("models")?;
    let (manifest, _) = manifest::from_bundled(
        &manifest::bundled(),
        "mlp version 1 is the mlp_small file, for the fleet drill",
        &[(
            "mlp_small",
            EntryChange {
                set: vec![
                    ("name", MODEL.into()),
                    ("max_queue_delay_ms", toml::Value::Float(0.0)),
                ],
                remove: vec!["description", "source"],
            },
        )],
    )?;
    std::fs::write(models.join("models.toml"), &manifest)?;
    let settings = work.path.join("settings.toml");
    std::fs::write(&settings, "max_batch_size = 64\nmax_queue_delay_ms = 0.0\n")?;

    eprintln!("[fleet] starting moto's S3 server ...");
    let s3 = S3::start()?;
    s3.create_bucket("fleet-drill")?;
    let registry = Registry {
        bin: bin.to_path_buf(),
        uri: "s3://fleet-drill/registry".into(),
        env: procs::s3_env(&s3.endpoint),
    };
    registry.run(&["seed", "--models", &models.display().to_string()])?;
    let mut pushed = vec![Pushed {
        version: "1".into(),
        file: "models/mlp_small/1/model.onnx".into(),
        note: "seeded: the mlp_small file".into(),
    }];
    for (i, drill) in options.drills.iter().enumerate() {
        let version = (i + 2).to_string();
        let (file, note) = drill.file();
        let path = procs::repo().join("models").join(file);
        registry.run(&[
            "push",
            "--name",
            MODEL,
            "--version",
            &version,
            &path.display().to_string(),
            "--config",
            &settings.display().to_string(),
            "--description",
            &format!("fleet drill: {note}"),
        ])?;
        pushed.push(Pushed {
            version,
            file: format!("models/{file}"),
            note: format!("{}: {note}", drill.name()),
        });
    }
    eprintln!(
        "[fleet] registry {} on {}: mlp versions 1..={}",
        registry.uri,
        s3.endpoint,
        pushed.len()
    );

    let empty = work.sub("no-models")?;
    let mut instances = Vec::new();
    for i in 0..options.instances {
        let id = format!("fleet-{i}");
        let cache = work.sub(&format!("cache-{i}"))?;
        let setup = InstanceSetup {
            bin,
            models: &empty,
            follow: Some(procs::Follow {
                registry: &registry,
                poll_secs: options.poll_secs,
                cache: &cache,
            }),
            port: 0,
            extra: &[],
            cpu: None,
        };
        instances.push(Instance::start(&setup, &id, out.join(format!("{id}.log")))?);
    }
    let client = crate::sysinfo::metrics_client()?;
    for instance in &instances {
        runtime.block_on(wait_ready(&client, instance, MODEL))?;
    }
    let instance_ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    eprintln!(
        "[fleet] {} instances serving mlp:1: {}",
        instances.len(),
        instances
            .iter()
            .map(|i| format!("{} {}", i.id, i.addr))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let port = balancer::free_port()?;
    let servers: Vec<(String, String)> = instances
        .iter()
        .map(|i| (i.id.clone(), i.addr.clone()))
        .collect();
    let haproxy_config = balancer::haproxy_config(port, &servers, options.check_ms, false);
    let config_path = out.join("haproxy.cfg");
    std::fs::write(&config_path, &haproxy_config)?;
    let mut haproxy = Haproxy::start(&config_path, port, out.join("haproxy.log"))?;
    let url = format!("{}/v2/models/{MODEL}/infer", haproxy.url);
    let body = crate::rest::mlp_request(1, 1, false).body;
    let infer = || {
        let json = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        json.body(body.clone())
    };
    runtime.block_on(wait_through(&instance_ids, infer))?;
    eprintln!("[fleet] haproxy on {} ({haproxy_version})", haproxy.url);

    // The load, and the clock every figure is read on.
    let t0 = Instant::now();
    let t0_ms = epoch_ms(SystemTime::now());
    let pids: Vec<(String, u32)> = instances
        .iter()
        .map(|i| ("instances".to_string(), i.pid()))
        .chain([
            ("haproxy".into(), haproxy.pid()),
            ("S3 server (moto)".into(), s3.pid()),
        ])
        .collect();
    let cpu_before = cpu_mark(&pids);
    let bound = options.step_timeout * options.drills.len() as u32 + Duration::from_secs(120);
    let load = load::Load::start(
        runtime,
        &haproxy.url,
        options.concurrency,
        options.rate,
        t0,
        t0 + bound,
    )?;
    eprintln!(
        "[fleet] load: {} requests/s through haproxy, {} tasks",
        options.rate, options.concurrency
    );

    let mut steps = Vec::new();
    let mut current = "1".to_string();
    for (i, drill) in options.drills.iter().enumerate() {
        let version = (i + 2).to_string();
        let step = run_step(
            options,
            *drill,
            &current,
            &version,
            &registry,
            t0,
            &mut haproxy,
        )
        .with_context(|| format!("drill {} ({current} → {version})", drill.name()))?;
        if *drill != Drill::FailingCanary {
            current = version;
        }
        steps.push(step);
    }
    let load_end_s = since(t0);
    let answers = load.finish(runtime)?;
    let cpu = cpu_share(cpu_before, cpu_mark(&pids));
    let status = registry.status()?;
    let history = model_history(&status)
        .into_iter()
        .map(|mut e| {
            let at = e["at_ms"].as_f64().unwrap_or(0.0);
            e["at_s"] = ((at - t0_ms) / 1000.0).into();
            e
        })
        .collect();
    eprintln!("[fleet] {} answers; stopping the fleet", answers.len());
    let haproxy_log = haproxy.log.clone();
    drop(haproxy);
    drop(instances);
    drop(s3);
    // haproxy says nothing unless something is wrong: keep its log only when it did.
    if std::fs::metadata(&haproxy_log).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(&haproxy_log);
    }
    Ok(Measured {
        pushed,
        instance_ids,
        haproxy_version,
        haproxy_config,
        steps,
        load_end_s,
        answers,
        history,
        cpu,
    })
}

/// One drill: from a fleet steady on `from`, deploy `to`, wait for the registry's outcome and
/// for every instance's report to show it.
fn run_step(
    options: &FleetOptions,
    drill: Drill,
    from: &str,
    to: &str,
    registry: &Registry,
    t0: Instant,
    haproxy: &mut Haproxy,
) -> anyhow::Result<StepRecord> {
    let begin_s = since(t0);
    std::thread::sleep(options.settle);
    let args = options.deploy_args(drill, to);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    eprintln!("[fleet] {}: registry {}", drill.name(), args.join(" "));
    let deploy_started_s = since(t0);
    let deploy_output = registry.run(&arg_refs)?;
    let deploy_returned_s = since(t0);
    let deadline = Instant::now() + options.step_timeout;
    loop {
        if !haproxy.running() {
            bail!("haproxy exited; see {}", haproxy.log.display());
        }
        let status = registry.status()?;
        if let Some(outcome) = outcome(&model_history(&status), to) {
            let event = outcome["event"].as_str().unwrap_or("");
            let default = if event == "rolled_back" { from } else { to };
            if instances_settled(&status, default) {
                eprintln!(
                    "[fleet] {}: {event} {:.1} s after the deploy returned; every instance on {default}",
                    drill.name(),
                    since(t0) - deploy_returned_s
                );
                break;
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no settled outcome within {:?} of the deploy; the registry's status:\n{}",
                options.step_timeout,
                serde_json::to_string_pretty(&status).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let reports_settled_s = since(t0);
    std::thread::sleep(options.settle);
    Ok(StepRecord {
        drill,
        strategy: drill.strategy(),
        from: from.to_string(),
        to: to.to_string(),
        deploy_command: format!(
            "streamserve registry --registry {} {}",
            registry.uri,
            args.join(" ")
        ),
        deploy_output: deploy_output.trim().to_string(),
        begin_s,
        deploy_started_s,
        deploy_returned_s,
        reports_settled_s,
        end_s: since(t0),
    })
}

/// Waits (at most 60 s) until `instance` serves `model` (for the drill: `mlp` version 1, from
/// the registry).
pub(crate) async fn wait_ready(
    client: &reqwest::Client,
    instance: &Instance,
    model: &str,
) -> anyhow::Result<()> {
    let url = format!("http://{}/v2/models/{model}/ready", instance.addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "instance {} does not serve {model} 60 s after it started:\n{}",
                instance.id,
                procs::log_tail(&instance.log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (at most 30 s) until `request`s through haproxy have been answered (`x-served-by`)
/// by every instance of `ids`.
pub(crate) async fn wait_through(
    ids: &[String],
    request: impl Fn() -> reqwest::RequestBuilder,
) -> anyhow::Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < ids.len() {
        if Instant::now() >= deadline {
            bail!("through haproxy, only {seen:?} of {ids:?} answered within 30 s");
        }
        match request().send().await {
            Ok(r) if r.status().is_success() => {
                if let Some(by) = r.headers().get("x-served-by").and_then(|v| v.to_str().ok()) {
                    seen.insert(by.to_string());
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(())
}
