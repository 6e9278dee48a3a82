//! The server one admission variant of `loadgen overload` runs against: streamserve in this
//! process (unpinned), or (`--pin`) the release `streamserve` binary as a child process pinned
//! to one CPU while this load generator's threads are pinned to another, so that the server's
//! CPU, not a CPU shared with its load, is what runs out.
//!
//! The child is the equivalent of
//! `taskset -c 0 streamserve serve --host 127.0.0.1 --port P --http-workers 1 --grpc-port off
//! --models DIR --admission MODE --log info,streamserve::access=warn`: the affinity is set
//! between fork and exec (`sched_setaffinity`), as is `PR_SET_PDEATHSIG`, so that the child
//! dies with this process even when it is killed; otherwise it is stopped with SIGTERM (then
//! SIGKILL after 10 s) at the end of its variant, and on every error path (`Drop`).
//!
//! Also where every benchmark that starts the binary (`efficiency`, `keywords-bench`, `fleet`,
//! `streams-fleet`) finds it ([`server_bin`]).

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use streamserve::config::Admission;

use super::{FALLBACK, PRIMARY};
use crate::bench::{start_server_with, stop_server};
use crate::fleet::balancer::free_port;
use crate::fleet::procs::{die_with_parent, log_tail, stop_child};

/// The CPUs of a pinned run: the server's and the load generator's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pinning {
    pub server_cpu: usize,
    pub loadgen_cpu: usize,
}

impl Pinning {
    /// The first two CPUs this process may run on (usually 0 and 1).
    pub fn choose() -> anyhow::Result<Pinning> {
        Pinning::from_allowed(&allowed_cpus()?)
    }

    /// The first two of `allowed`; an error with fewer than two.
    pub fn from_allowed(allowed: &[usize]) -> anyhow::Result<Pinning> {
        match allowed {
            [server_cpu, loadgen_cpu, ..] => Ok(Pinning {
                server_cpu: *server_cpu,
                loadgen_cpu: *loadgen_cpu,
            }),
            _ => bail!(
                "--pin needs at least 2 CPUs (the server on one, the load generator on another); \
                 this process may use {} ({allowed:?}): run without --pin",
                allowed.len()
            ),
        }
    }

    /// Pins every thread of this process to the load generator's CPU; threads started later
    /// (the client runtime's) inherit it. Call before the client runtime starts. Dropping the
    /// guard gives every thread back the CPUs it had (a suite goes on after this run).
    pub fn pin_this_process(&self) -> anyhow::Result<Unpin> {
        let guard = Unpin {
            allowed: allowed_cpus()?,
        };
        set_all_threads(&[self.loadgen_cpu])
            .with_context(|| format!("cannot pin this process to CPU {}", self.loadgen_cpu))?;
        Ok(guard)
    }
}

/// Puts this process's threads back on the CPUs they had before [`Pinning::pin_this_process`].
pub struct Unpin {
    allowed: Vec<usize>,
}

impl Drop for Unpin {
    fn drop(&mut self) {
        if let Err(e) = set_all_threads(&self.allowed) {
            eprintln!("[overload] cannot restore this process's CPU affinity: {e:#}");
        }
    }
}

/// `sched_setaffinity` on every thread of this process.
fn set_all_threads(cpus: &[usize]) -> anyhow::Result<()> {
    let tasks = std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")?;
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        match set_affinity(tid, cpus) {
            Ok(()) => {}
            // A thread that has just exited.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e).with_context(|| format!("thread {tid}")),
        }
    }
    Ok(())
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET bounds-checks `cpu` against the set's size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

/// `sched_setaffinity(tid, cpus)`; tid 0 is the calling thread. Async-signal-safe (one
/// system call, no allocation), so it may run between fork and exec.
fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The CPUs this process may run on, in increasing order.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: all zeroes is the empty set; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        bail!(
            "cannot read this process's CPU affinity: {}",
            std::io::Error::last_os_error()
        );
    }
    let max = 8 * std::mem::size_of_val(&set);
    // SAFETY: every index is within the set.
    Ok((0..max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// The `streamserve` arguments of a pinned run's server.
pub fn serve_args(port: u16, models: &Path, admission: Admission) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--http-workers",
        "1",
        "--grpc-port",
        "off",
        "--models",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push(models.as_os_str().to_owned());
    for a in ["--admission", mode_name(admission)] {
        args.push(a.into());
    }
    for a in ["--log", "info,streamserve::access=warn"] {
        args.push(a.into());
    }
    args
}

/// How `--admission` spells a mode.
pub fn mode_name(mode: Admission) -> &'static str {
    match mode {
        Admission::Adaptive => "adaptive",
        Admission::Static => "static",
    }
}

/// The shell command a pinned server stands for, for the report.
pub fn shell_command(bin: &Path, pinning: &Pinning, args: &[OsString]) -> String {
    let mut words = vec![
        "taskset".to_string(),
        "-c".into(),
        pinning.server_cpu.to_string(),
        bin.display().to_string(),
    ];
    words.extend(args.iter().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
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

/// A `streamserve` child process; stopped when dropped.
pub struct ChildServer {
    child: Option<Child>,
    pub pid: u32,
    pub base: String,
    pub command: String,
    log: PathBuf,
}

impl ChildServer {
    /// Starts `bin` on `models` pinned to `pinning.server_cpu`, its output in `log`, and waits
    /// (at most 30 s) until it and both models are ready. `STREAMSERVE_*` variables are not
    /// passed on: the server runs with its defaults and these flags, as the in-process one does.
    pub fn start(
        bin: &Path,
        models: &Path,
        admission: Admission,
        pinning: Pinning,
        log: PathBuf,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<ChildServer> {
        if !bin.is_file() {
            bail!(
                "{} does not exist: build it (`cargo build --release --workspace`) or name it with --server-bin",
                bin.display()
            );
        }
        let port = free_port()?;
        let args = serve_args(port, models, admission);
        let command = shell_command(bin, &pinning, &args);
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STREAMSERVE_") {
                cmd.env_remove(key);
            }
        }
        let cpu = pinning.server_cpu;
        // SAFETY: the closure makes one system call and allocates nothing.
        unsafe {
            cmd.pre_exec(move || set_affinity(0, &[cpu]));
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {command}"))?;
        let mut server = ChildServer {
            pid: child.id(),
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            command,
            log,
        };
        runtime.block_on(server.wait_ready())?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = crate::sysinfo::metrics_client()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let paths = [
            "/v2/health/ready".to_string(),
            format!("/v2/models/{PRIMARY}/ready"),
            format!("/v2/models/{FALLBACK}/ready"),
        ];
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the server exited ({status}) before it was ready: {}\n{}",
                    self.command,
                    log_tail(&self.log, 30)
                );
            }
            let mut ready = true;
            for path in &paths {
                let ok = client
                    .get(format!("{}{path}", self.base))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                ready &= ok;
                if !ok {
                    break;
                }
            }
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the server is not ready 30 s after it started: {}\n{}",
                    self.command,
                    log_tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL when it has not exited within 10 s; waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if stop_child(&mut child, Duration::from_secs(10)) {
            eprintln!(
                "[overload] the server (pid {}) did not stop within 10 s of SIGTERM; killing it",
                self.pid
            );
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server of one variant.
pub enum Server {
    InProcess(streamserve::server::Running),
    Child(ChildServer),
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

    pub fn base(&self) -> String {
        match self {
            Server::InProcess(running) => format!("http://{}", running.addr),
            Server::Child(child) => child.base.clone(),
        }
    }

    /// The child's process id (`None` in-process).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Server::InProcess(_) => None,
            Server::Child(child) => Some(child.pid),
        }
    }

    pub fn stop(self) {
        match self {
            Server::InProcess(running) => stop_server(&running),
            Server::Child(mut child) => child.stop(),
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
    fn pinning_takes_the_first_two_allowed_cpus() {
        let p = Pinning::from_allowed(&[0, 1]).unwrap();
        assert_eq!((p.server_cpu, p.loadgen_cpu), (0, 1));
        let p = Pinning::from_allowed(&[2, 3, 5]).unwrap();
        assert_eq!((p.server_cpu, p.loadgen_cpu), (2, 3));
        let e = Pinning::from_allowed(&[0]).unwrap_err().to_string();
        assert!(e.contains("at least 2 CPUs"), "{e}");
        assert!(Pinning::from_allowed(&[]).is_err());
        assert!(!allowed_cpus().unwrap().is_empty());
    }

    #[test]
    fn a_pinned_thread_gets_its_cpus_back_from_the_guard() {
        let before = allowed_cpus().unwrap();
        let Ok(pinning) = Pinning::from_allowed(&before) else {
            return;
        };
        // One thread pinned (not the whole test process), then every thread set back.
        let (pinned, after) = std::thread::spawn(move || {
            set_affinity(0, &[pinning.loadgen_cpu]).unwrap();
            let pinned = allowed_cpus().unwrap();
            drop(Unpin { allowed: before });
            (pinned, allowed_cpus().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(pinned, [pinning.loadgen_cpu]);
        assert_eq!(after, allowed_cpus().unwrap());
    }

    #[test]
    fn the_child_command_line() {
        let args = serve_args(18080, Path::new("/tmp/m"), Admission::Static);
        let words: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            words.join(" "),
            "serve --host 127.0.0.1 --port 18080 --http-workers 1 --grpc-port off --models /tmp/m \
             --admission static --log info,streamserve::access=warn"
        );
        let adaptive = serve_args(1, Path::new("/m"), Admission::Adaptive);
        assert!(adaptive.contains(&OsString::from("adaptive")));
        let pinning = Pinning {
            server_cpu: 0,
            loadgen_cpu: 1,
        };
        let shell = shell_command(Path::new("/x/streamserve"), &pinning, &args);
        assert!(
            shell.starts_with("taskset -c 0 /x/streamserve serve --host 127.0.0.1"),
            "{shell}"
        );
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
            server_cpu: allowed_cpus().unwrap()[0],
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
        let e = ChildServer::start(
            bin,
            &dir,
            Admission::Static,
            pinning,
            dir.join("log"),
            &runtime,
        )
        .err()
        .expect("a server that exits is an error")
        .to_string();
        assert!(e.contains("exited"), "{e}");
        let missing = ChildServer::start(
            &dir.join("nothing"),
            &dir,
            Admission::Static,
            pinning,
            dir.join("log"),
            &runtime,
        );
        assert!(missing.err().unwrap().to_string().contains("--server-bin"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
