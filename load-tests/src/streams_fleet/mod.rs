//! `loadgen streams-fleet`: real-time speech streams through a rolling restart of the fleet.
//!
//! Starts N `streamserve serve` processes (the release binary, `silero_vad` alone) on fixed
//! loopback ports, sharing one stream token keys file, behind haproxy (round robin per
//! connection, health-checked, WebSocket tunnels); runs one solo stream straight to an instance
//! as the reference; then M real-time streams through haproxy ([`client`]), each asking for
//! checkpoints and resuming wherever it lands. Meanwhile every instance in turn is sent SIGTERM
//! (it hands its streams over and drains), started again on the same port once it has exited,
//! and given a few seconds before the next. [`analysis`] compares every stream with the solo
//! run and writes the report; the processes come from [`crate::fleet::procs`].

pub mod analysis;
pub mod client;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::builder::TypedValueParser as _;

use crate::cli::{count, secs, BenchCommon, ServerBin};
use crate::fleet::balancer::{self, Haproxy};
use crate::fleet::procs::{Instance, InstanceSetup, TempDir};
use crate::fleet::since;
use crate::manifest::{self, EntryChange};
use crate::sysinfo::{process_ticks, wait_for_quiet};
use client::{StreamRun, StreamSpec};

/// The plot written beside `report.md`.
pub const PLOT_FILE: &str = "streams-fleet.svg";
pub const MODEL: &str = "silero_vad";

/// `loadgen streams-fleet`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct StreamsFleetOptions {
    /// `streamserve serve` instances behind haproxy.
    #[arg(long, default_value_t = 3, value_parser = count(2, 8))]
    pub instances: usize,
    /// Concurrent real-time streams through haproxy.
    #[arg(long, default_value_t = 40, value_parser = count(1, 1000))]
    pub streams: usize,
    /// Passes of tests/audio/two_phrases_16k.wav (9.44 s) each stream sends, back to back.
    #[arg(long, default_value_t = 5, value_parser = count(1, 60))]
    pub audio_loops: usize,
    /// Seconds over which the streams open, evenly spread.
    #[arg(long = "ramp-secs", value_name = "RAMP_SECS", default_value = "3", value_parser = secs(0, 60))]
    pub ramp: Duration,
    /// The instances' `--stream-checkpoint-ms`.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub checkpoint_ms: u64,
    /// The instances' `--drain-secs`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub drain_secs: u64,
    /// Seconds after the first stream opened before the first instance is restarted.
    #[arg(long = "restart-after-secs", value_name = "RESTART_AFTER_SECS", default_value = "8", value_parser = secs(1, 600))]
    pub restart_after: Duration,
    /// Seconds a restarted instance serves (ready) before the next one is restarted.
    #[arg(long = "restart-gap-secs", value_name = "RESTART_GAP_SECS", default_value = "5", value_parser = secs(0, 600))]
    pub restart_gap: Duration,
    /// haproxy's health check interval, ms.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(100..=10_000))]
    pub check_ms: u64,
    /// Milliseconds of audio per binary frame.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub frame_ms: u32,
    /// Width of the time bins of the plot, ms.
    #[arg(long = "bin-ms", value_name = "BIN_MS", default_value = "500",
          value_parser = clap::value_parser!(u64).range(50..=5000).map(Duration::from_millis))]
    pub bin: Duration,
    /// Seals and opens of a checkpoint timed in this process (CPU per checkpoint).
    #[arg(long, default_value_t = 10_000, value_parser = count(100, 1_000_000))]
    pub seal_iterations: usize,
    #[command(flatten)]
    pub server: ServerBin,
    #[command(flatten)]
    pub common: BenchCommon,
}

impl Default for StreamsFleetOptions {
    fn default() -> Self {
        crate::cli::defaults()
    }
}

/// Seconds a restart is given for its drain, start and readiness, for [`StreamsFleetOptions::check`].
const RESTART_ALLOWANCE_S: f64 = 3.0;

impl StreamsFleetOptions {
    /// Refuses a run whose restarts would not all happen while the streams run.
    pub fn check(&self, audio_secs: f64) -> anyhow::Result<()> {
        let restarts_end = self.restart_after.as_secs_f64()
            + self.instances as f64 * (self.restart_gap.as_secs_f64() + RESTART_ALLOWANCE_S);
        let streams_end = audio_secs * self.audio_loops as f64;
        if restarts_end + 2.0 > streams_end {
            bail!(
                "the streams last {streams_end:.0} s but the rolling restart needs about {restarts_end:.0} s: \
                 more --audio-loops, or a shorter --restart-after-secs / --restart-gap-secs"
            );
        }
        if self.ramp >= self.restart_after {
            bail!("every stream must be open before the first restart: --ramp-secs < --restart-after-secs");
        }
        Ok(())
    }
}

/// One instance's restart, in seconds since the streams started.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Restart {
    pub instance: String,
    pub term_s: f64,
    pub exited_s: f64,
    /// It exited on its own after SIGTERM (else it was killed after the drain time + 10 s).
    pub graceful: bool,
    pub listening_s: f64,
    pub ready_s: f64,
}

/// Everything the drill measured.
pub struct Measured {
    pub instance_ids: Vec<String>,
    pub ports: Vec<u16>,
    pub haproxy_version: String,
    pub haproxy_config: String,
    pub audio_secs: f64,
    pub solo: StreamRun,
    pub runs: Vec<StreamRun>,
    pub restarts: Vec<Restart>,
    pub end_s: f64,
    /// CPU seconds over the streams: (part, seconds).
    pub cpu: Vec<(String, f64)>,
    /// The newest resume token any stream got, for the seal/open timing.
    pub token: Option<String>,
    pub keys: streamserve::stream::checkpoint::TokenKeys,
}

/// Runs the drill and writes its report.
pub fn run(options: &StreamsFleetOptions) -> anyhow::Result<(crate::report::Outcome, bool)> {
    let audio = crate::streams::Audio::load(&crate::streams::default_wav())?;
    options.check(audio.seconds())?;
    let bin = options.server.get()?;
    let haproxy_version = Haproxy::version()?;
    let start = crate::report::Start::now(options.common.out.as_deref(), "streams-fleet");
    std::fs::create_dir_all(&start.dir)
        .with_context(|| format!("cannot create {}", start.dir.display()))?;
    crate::sysinfo::raise_nofile_limit(options.streams as u64 * 2 + 256);
    wait_for_quiet(crate::sysinfo::QUIET_CORES, options.common.quiet_wait);
    let runtime = crate::sysinfo::client_runtime(options.common.threads.get())?;
    let measured = drill(options, &audio, &bin, haproxy_version, &start.dir, &runtime)?;
    drop(runtime);
    eprintln!(
        "[streams-fleet] timing {} seals and opens of a checkpoint ...",
        options.seal_iterations
    );
    let seal = analysis::seal_open(
        &measured.keys,
        measured.token.as_deref(),
        options.seal_iterations,
    );
    analysis::write(options, &start, &measured, &seal)
}

/// One instance's place in the fleet: its id and port stay, its process is replaced.
struct Slot {
    id: String,
    port: u16,
    instance: Instance,
    /// CPU ticks within the streams' time of its processes that have exited.
    ticks_done: u64,
    /// Its current process's ticks when the streams started (0 for one started after).
    ticks_base: u64,
    restarts: usize,
}

fn drill(
    options: &StreamsFleetOptions,
    audio: &crate::streams::Audio,
    bin: &Path,
    haproxy_version: String,
    out: &Path,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Measured> {
    let work = TempDir::create("streams-fleet")?;
    let models = work.sub("models")?;
    let (manifest, _) = manifest::from_bundled(
        &manifest::bundled(),
        "silero_vad alone, without fallback or slo_ms, for the streams fleet drill",
        &[(
            MODEL,
            EntryChange {
                set: Vec::new(),
                remove: vec!["fallback", "slo_ms"],
            },
        )],
    )?;
    std::fs::write(models.join("models.toml"), &manifest)?;
    let keys_file = work.path.join("stream-token-keys");
    let key = streamserve::stream::checkpoint::new_key().map_err(anyhow::Error::msg)?;
    std::fs::write(&keys_file, format!("{key}\n"))?;
    let keys = streamserve::stream::checkpoint::TokenKeys::from_file(&keys_file)
        .map_err(anyhow::Error::msg)?;
    let extra: Vec<String> = vec![
        "--stream-token-keys".into(),
        keys_file.display().to_string(),
        "--stream-checkpoint-ms".into(),
        options.checkpoint_ms.to_string(),
        "--drain-secs".into(),
        options.drain_secs.to_string(),
    ];
    let start_instance = |id: &str, port: u16, log: PathBuf| {
        let setup = InstanceSetup {
            bin,
            models: &models,
            follow: None,
            port,
            extra: &extra,
            cpu: None,
        };
        Instance::start(&setup, id, log)
    };
    let client = crate::sysinfo::metrics_client()?;
    let ports = balancer::fixed_ports(options.instances)?;
    let mut slots = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = format!("s{i}");
        let instance = start_instance(&id, *port, out.join(format!("{id}.log")))?;
        slots.push(Slot {
            id,
            port: *port,
            instance,
            ticks_done: 0,
            ticks_base: 0,
            restarts: 0,
        });
    }
    for slot in &slots {
        runtime.block_on(crate::fleet::wait_ready(&client, &slot.instance, MODEL))?;
    }
    let instance_ids: Vec<String> = slots.iter().map(|s| s.id.clone()).collect();
    let servers: Vec<(String, String)> = slots
        .iter()
        .map(|s| (s.id.clone(), s.instance.addr.clone()))
        .collect();
    let haproxy_port = balancer::free_port()?;
    let haproxy_config = balancer::haproxy_config(haproxy_port, &servers, options.check_ms, true);
    let config_path = out.join("haproxy.cfg");
    std::fs::write(&config_path, &haproxy_config)?;
    let mut haproxy = Haproxy::start(&config_path, haproxy_port, out.join("haproxy.log"))?;
    // Until haproxy has passed a readiness check to every instance.
    let ready = format!("{}/v2/health/ready", haproxy.url);
    runtime.block_on(crate::fleet::wait_through(&instance_ids, || {
        client.get(&ready)
    }))?;
    eprintln!(
        "[streams-fleet] {} instances ({}) behind haproxy on {} ({haproxy_version})",
        slots.len(),
        servers
            .iter()
            .map(|(id, addr)| format!("{id} {addr}"))
            .collect::<Vec<_>>()
            .join(", "),
        haproxy.url
    );

    // The stream's audio, and what one uninterrupted stream of it gives.
    let pass = audio.frame(0, audio.samples);
    let pcm: Vec<u8> = pass.repeat(options.audio_loops);
    let audio_secs = audio.seconds() * options.audio_loops as f64;
    let frame_samples = (audio.sample_rate as usize * options.frame_ms as usize / 1000).max(1);
    let now = Instant::now();
    let solo_spec = StreamSpec {
        url: format!("http://{}", slots[0].instance.addr),
        audio: pcm.clone(),
        rate: audio.sample_rate,
        speed: 20.0,
        frame_samples,
        max_connections: 1,
        deadline: now + Duration::from_secs(120),
    };
    let solo = runtime.block_on(client::run_stream(&solo_spec, now, now));
    if solo.finished_s.is_none() {
        bail!(
            "the solo stream did not finish: {:?} {:?}",
            solo.error,
            solo.connections
        );
    }
    eprintln!(
        "[streams-fleet] solo run: {} results for {audio_secs:.1} s of audio",
        solo.results.len()
    );

    let ramp = options.ramp;
    let spec = Arc::new(StreamSpec {
        url: haproxy.url.clone(),
        audio: pcm,
        rate: audio.sample_rate,
        speed: 1.0,
        frame_samples,
        max_connections: 50,
        deadline: Instant::now() + ramp + Duration::from_secs_f64(audio_secs + 60.0),
    });
    let own_pid = std::process::id();
    let machine_before = crate::sysinfo::CpuSnapshot::take();
    let t0 = Instant::now();
    for slot in &mut slots {
        slot.ticks_base = process_ticks(slot.instance.pid()).unwrap_or(0);
    }
    let (haproxy_base, own_base) = (
        process_ticks(haproxy.pid()).unwrap_or(0),
        process_ticks(own_pid).unwrap_or(0),
    );
    let handles: Vec<_> = (0..options.streams)
        .map(|i| {
            let spec = spec.clone();
            let at = t0 + ramp.mul_f64(i as f64 / options.streams as f64);
            runtime.spawn(async move { client::run_stream(&spec, t0, at).await })
        })
        .collect();
    eprintln!(
        "[streams-fleet] {} real-time streams of {audio_secs:.1} s through haproxy, opening over {:.0} s",
        options.streams,
        ramp.as_secs_f64()
    );

    std::thread::sleep(options.restart_after);
    let mut restarts = Vec::new();
    for slot in &mut slots {
        if !haproxy.running() {
            bail!("haproxy exited; see {}", haproxy.log.display());
        }
        let restart = restart(options, slot, t0, &start_instance, out, &client, runtime)?;
        eprintln!(
            "[streams-fleet] {}: SIGTERM at {:.1} s, exited {:.2} s later{}, ready again {:.2} s after that",
            restart.instance,
            restart.term_s,
            restart.exited_s - restart.term_s,
            if restart.graceful { "" } else { " (killed)" },
            restart.ready_s - restart.exited_s
        );
        restarts.push(restart);
        std::thread::sleep(options.restart_gap);
    }
    eprintln!("[streams-fleet] every instance restarted; waiting for the streams to end");

    let bound = spec.deadline + Duration::from_secs(30);
    let runs = runtime.block_on(async {
        let mut runs = Vec::new();
        for handle in handles {
            let left = bound.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, handle).await {
                Ok(Ok(run)) => runs.push(run),
                Ok(Err(e)) => bail!("a stream task failed: {e}"),
                Err(_) => bail!("a stream did not end by its deadline"),
            }
        }
        Ok(runs)
    })?;
    let end_s = since(t0);
    let tps = crate::sysinfo::ticks_per_second() as f64;
    let mut cpu: Vec<(String, f64)> = slots
        .iter()
        .map(|s| {
            let now = process_ticks(s.instance.pid()).unwrap_or(0);
            let ticks = s.ticks_done + now.saturating_sub(s.ticks_base);
            (
                format!("instance {} ({} processes)", s.id, s.restarts + 1),
                ticks as f64 / tps,
            )
        })
        .collect();
    cpu.push((
        "haproxy".into(),
        process_ticks(haproxy.pid())
            .unwrap_or(0)
            .saturating_sub(haproxy_base) as f64
            / tps,
    ));
    let children: f64 = cpu.iter().map(|(_, s)| s).sum();
    cpu.push((
        "loadgen (the streams' client)".into(),
        process_ticks(own_pid).unwrap_or(0).saturating_sub(own_base) as f64 / tps,
    ));
    if let (Some(before), Some(after)) = (machine_before, crate::sysinfo::CpuSnapshot::take()) {
        let others = after.since(&before).other_cores * end_s - children;
        cpu.push(("others (the rest of the machine)".into(), others.max(0.0)));
    }
    let token = runs
        .iter()
        .filter_map(|r| r.last_token.clone())
        .max_by_key(String::len);
    let haproxy_log = haproxy.log.clone();
    drop(haproxy);
    drop(slots);
    if std::fs::metadata(&haproxy_log).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(&haproxy_log);
    }
    Ok(Measured {
        instance_ids,
        ports,
        haproxy_version,
        haproxy_config,
        audio_secs,
        solo,
        runs,
        restarts,
        end_s,
        cpu,
        token,
        keys,
    })
}

/// SIGTERM to `slot`'s instance, a wait for its exit (its CPU ticks read meanwhile), the same
/// instance started again on the same port, and a wait until it serves the model.
fn restart(
    options: &StreamsFleetOptions,
    slot: &mut Slot,
    t0: Instant,
    start_instance: &dyn Fn(&str, u16, PathBuf) -> anyhow::Result<Instance>,
    out: &Path,
    client: &reqwest::Client,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Restart> {
    let pid = slot.instance.pid();
    let mut ticks = process_ticks(pid).unwrap_or(0);
    let term_s = since(t0);
    slot.instance.terminate();
    let deadline = Instant::now() + Duration::from_secs(options.drain_secs + 10);
    while !slot.instance.exited() && Instant::now() < deadline {
        ticks = process_ticks(pid).unwrap_or(ticks);
        std::thread::sleep(Duration::from_millis(10));
    }
    let graceful = slot.instance.exited();
    if !graceful {
        slot.instance.stop();
    }
    let exited_s = since(t0);
    slot.ticks_done += ticks.saturating_sub(slot.ticks_base);
    slot.ticks_base = 0;
    slot.restarts += 1;
    let log = out.join(format!("{}-restart-{}.log", slot.id, slot.restarts));
    slot.instance = start_instance(&slot.id, slot.port, log)?;
    let listening_s = since(t0);
    runtime.block_on(crate::fleet::wait_ready(client, &slot.instance, MODEL))?;
    Ok(Restart {
        instance: slot.id.clone(),
        term_s,
        exited_s,
        graceful,
        listening_s,
        ready_s: since(t0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_restart_every_instance_while_the_streams_run() {
        let o = StreamsFleetOptions::default();
        o.check(9.44).unwrap();
        assert_eq!(
            (o.instances, o.streams, o.checkpoint_ms, o.drain_secs),
            (3, 40, 1000, 10)
        );
        let mut short = o.clone();
        short.audio_loops = 2;
        assert!(short.check(9.44).is_err());
        let mut late = o.clone();
        late.ramp = Duration::from_secs(8);
        assert!(late.check(9.44).is_err());
    }

    #[test]
    fn the_scenario_file_gives_these_options() {
        let o: StreamsFleetOptions =
            crate::scenario::bundled_options("streams-fleet.toml", "streams-fleet");
        o.check(9.44).unwrap();
        assert_eq!((o.instances, o.streams), (3, 40));
    }
}
