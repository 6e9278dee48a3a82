//! The server one admission variant of `loadgen overload` runs against: streamserve in this
//! process (unpinned), or (`--pin`) the release `streamserve` binary as a child process on one
//! CPU while this load generator's threads are pinned to another ([`crate::pinning`]), so that
//! the server's CPU, not a CPU shared with its load, is what runs out.
//!
//! The child is a [`crate::fleet::procs::Instance`]: `taskset -c 0 streamserve serve --host
//! 127.0.0.1 --grpc-port off --http-workers 1 --log-format json --log
//! info,streamserve::access=warn --port 0 --models DIR --instance-id overload-MODE --admission
//! MODE`, the affinity set between fork and exec, as is `PR_SET_PDEATHSIG`, so that the child
//! dies with this process even when it is killed; otherwise it is stopped with SIGTERM (then
//! SIGKILL after 10 s) at the end of its variant, and on every error path (`Drop`).
//!
//! Also where every benchmark that starts the binary (`efficiency`, `keywords-bench`, `fleet`,
//! `streams-fleet`) finds it ([`server_bin`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use streamserve::config::Admission;

use super::{FALLBACK, PRIMARY};
use crate::bench::{start_server_with, stop_server};
use crate::fleet::procs::{Instance, InstanceSetup};
use crate::pinning::Pinning;

/// How `--admission` spells a mode.
pub fn mode_name(mode: Admission) -> &'static str {
    match mode {
        Admission::Adaptive => "adaptive",
        Admission::Static => "static",
    }
}

/// `streamserve` beside the running executable (`target/release/` holds both).
pub fn default_server_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    Ok(exe.with_file_name("streamserve"))
}

/// The `--server-bin` of the benchmarks that start `streamserve serve` themselves: `given`, or
/// [`default_server_bin`]; an error when it does not exist.
pub fn server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(bin) => bin.to_path_buf(),
        None => default_server_bin()?,
    };
    if !bin.is_file() {
        bail!(
            "{} does not exist: build it (`cargo build --release --bin streamserve`) or name it with --server-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// The server of one variant.
pub enum Server {
    InProcess(streamserve::server::Running),
    /// A pinned child, and its command line for the report.
    Child(Instance, String),
}

impl Server {
    /// streamserve in this process on `models` with `admission`, both models ready.
    pub fn in_process(models: &Path, admission: Admission) -> anyhow::Result<Server> {
        let config = streamserve::config::Config {
            models: models.to_path_buf(),
            admission,
            ..Default::default()
        };
        let running = start_server_with(config, PRIMARY, 64)?;
        if let Err(e) = super::wait_ready(&running, FALLBACK) {
            stop_server(&running);
            return Err(e);
        }
        Ok(Server::InProcess(running))
    }

    /// `bin` on `models` with `admission`, on `pinning`'s server CPU, its output in `log`;
    /// both models ready. `STREAMSERVE_*` variables are not passed on: the server runs with its
    /// defaults and these flags, as the in-process one does.
    pub fn child(
        bin: &Path,
        models: &Path,
        (admission, pinning): (Admission, Pinning),
        log: PathBuf,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Server> {
        let extra = ["--admission", mode_name(admission)].map(String::from);
        let setup = InstanceSetup {
            bin,
            models,
            follow: None,
            port: 0,
            extra: &extra,
            cpu: Some(pinning.server_cpu),
        };
        let id = format!("overload-{}", mode_name(admission));
        let instance = Instance::start(&setup, &id, log)?;
        instance.wait_ready(&[PRIMARY, FALLBACK], runtime)?;
        Ok(Server::Child(instance, Instance::command_line(&setup, &id)))
    }

    pub fn base(&self) -> String {
        match self {
            Server::InProcess(running) => format!("http://{}", running.addr),
            Server::Child(child, _) => format!("http://{}", child.addr),
        }
    }

    /// The child's process id (`None` in-process).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Server::InProcess(_) => None,
            Server::Child(child, _) => Some(child.pid()),
        }
    }

    /// The child's command line and its output so far (`None` in-process).
    pub fn command_and_log(&self) -> Option<(String, String)> {
        match self {
            Server::InProcess(_) => None,
            Server::Child(child, command) => {
                let log = std::fs::read_to_string(&child.log).unwrap_or_default();
                Some((command.clone(), log))
            }
        }
    }

    pub fn stop(self) {
        match self {
            Server::InProcess(running) => stop_server(&running),
            Server::Child(mut child, _) => child.stop(),
        }
    }
}

/// CPU counters of a pinned run: both CPUs and the server process.
#[derive(Clone, Copy, Debug)]
pub struct PinnedSnapshot {
    at: Instant,
    server_cpu: (u64, u64),
    loadgen_cpu: (u64, u64),
    server_process: u64,
}

/// What the CPUs of a pinned run did over a period.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PinnedCpu {
    /// Share of the server's CPU that was busy (with anything), 0..1.
    pub server_cpu_busy: f64,
    /// Share of the load generator's CPU that was busy, 0..1.
    pub loadgen_cpu_busy: f64,
    /// CPU cores' worth of time the server process used.
    pub server_process_cores: f64,
}

impl PinnedSnapshot {
    pub fn take(pinning: &Pinning, pid: u32) -> Option<PinnedSnapshot> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        Some(PinnedSnapshot {
            at: Instant::now(),
            server_cpu: crate::sysinfo::cpu_ticks(&stat, pinning.server_cpu)?,
            loadgen_cpu: crate::sysinfo::cpu_ticks(&stat, pinning.loadgen_cpu)?,
            server_process: crate::sysinfo::process_ticks(pid)?,
        })
    }

    pub fn since(&self, earlier: &PinnedSnapshot) -> PinnedCpu {
        let busy = |now: (u64, u64), then: (u64, u64)| {
            let total = now.1.saturating_sub(then.1).max(1) as f64;
            (now.0.saturating_sub(then.0) as f64 / total).min(1.0)
        };
        let seconds = self.at.duration_since(earlier.at).as_secs_f64().max(1e-3);
        let ticks = self.server_process.saturating_sub(earlier.server_process) as f64;
        PinnedCpu {
            server_cpu_busy: busy(self.server_cpu, earlier.server_cpu),
            loadgen_cpu_busy: busy(self.loadgen_cpu, earlier.loadgen_cpu),
            server_process_cores: ticks / crate::sysinfo::ticks_per_second() as f64 / seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_command_line() {
        let extra = ["--admission", mode_name(Admission::Static)].map(String::from);
        let setup = InstanceSetup {
            bin: Path::new("/x/streamserve"),
            models: Path::new("/tmp/m"),
            follow: None,
            port: 0,
            extra: &extra,
            cpu: Some(0),
        };
        assert_eq!(
            Instance::command_line(&setup, "overload-static"),
            "taskset -c 0 /x/streamserve serve --host 127.0.0.1 --grpc-port off --http-workers 1 \
             --log-format json --log info,streamserve::access=warn --port 0 --models /tmp/m \
             --instance-id overload-static --admission static"
        );
        assert_eq!(mode_name(Admission::Adaptive), "adaptive");
        assert_eq!(
            default_server_bin().unwrap().file_name().unwrap(),
            "streamserve"
        );
    }

    #[test]
    fn a_child_that_exits_is_reported_with_its_output() {
        let dir = std::env::temp_dir().join(format!("overload-child-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = crate::sysinfo::client_runtime(1).unwrap();
        let pinning = Pinning {
            server_cpu: crate::pinning::allowed_cpus().unwrap()[0],
            loadgen_cpu: 0,
        };
        // `false` ignores its arguments and exits 1 at once.
        let Some(bin) = ["/bin/false", "/usr/bin/false"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
        else {
            return;
        };
        let variant = (Admission::Static, pinning);
        let e = Server::child(bin, &dir, variant, dir.join("log"), &runtime)
            .err()
            .expect("a server that exits is an error")
            .to_string();
        assert!(e.contains("exited"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
