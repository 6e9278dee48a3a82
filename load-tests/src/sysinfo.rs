//! What the benchmark reports say about the machine and its CPU use, from `/proc` through
//! the `procfs` crate (Linux); anything unreadable is reported as "unknown" (or `None`)
//! rather than failing the run.

use procfs::{Current as _, CurrentSI as _};

#[derive(Clone, Debug, serde::Serialize)]
pub struct MachineInfo {
    /// Logical CPUs this process may use.
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total: String,
    pub kernel: String,
    /// `/proc/loadavg` when the run started: a busy machine makes every figure lower.
    pub loadavg_at_start: String,
    /// How an idle CPU waits ([`cpu_idle`]): on a VM it changes the figures of a lightly
    /// loaded server by a third.
    pub cpu_idle: String,
}

impl MachineInfo {
    pub fn collect() -> MachineInfo {
        let unknown = || "unknown".to_string();
        let cpuinfo = procfs::CpuInfo::current().ok();
        let cpu_model = cpuinfo.as_ref().and_then(|c| {
            ["model name", "Model", "cpu model"]
                .iter()
                .find_map(|k| c.get_field(0, k).map(str::to_string))
        });
        let load = procfs::LoadAverage::current().ok().map(|l| {
            let (one, five, fifteen) = (l.one, l.five, l.fifteen);
            format!(
                "{one:.2} {five:.2} {fifteen:.2} {}/{} {}",
                l.cur, l.max, l.latest_pid
            )
        });
        MachineInfo {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model.unwrap_or_else(unknown),
            mem_total: procfs::Meminfo::current()
                .map_or_else(|_| unknown(), |m| format!("{} kB", m.mem_total / 1024)),
            kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(unknown),
            loadavg_at_start: load.unwrap_or_else(unknown),
            cpu_idle: cpu_idle(
                read_trimmed("/sys/devices/system/cpu/cpuidle/current_driver").as_deref(),
                read_trimmed("/sys/module/haltpoll/parameters/guest_halt_poll_ns").as_deref(),
            ),
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The CPU idle driver, and with `haltpoll` (KVM and Firecracker guests) how long an idle
/// virtual CPU polls before it halts. At 0 it halts at once, and waking a thread on it costs
/// the waker a trip through the hypervisor: measured on the development VM, a server at
/// concurrency 1 spent 193-224 µs of CPU a request with 0 and 138-153 µs with 200 µs of
/// polling (load-tests/results/2026-12-06-wakeups/).
pub fn cpu_idle(driver: Option<&str>, halt_poll_ns: Option<&str>) -> String {
    match (driver, halt_poll_ns) {
        (None, _) => "unknown".into(),
        (Some("haltpoll"), Some("0")) => {
            "haltpoll, guest_halt_poll_ns 0 (an idle vCPU halts at once)".into()
        }
        (Some("haltpoll"), Some(ns)) => format!("haltpoll, guest_halt_poll_ns {ns}"),
        (Some(driver), _) => driver.to_string(),
    }
}

/// CPU time counters, to tell how much of the machine other processes took during a run
/// (a benchmark on a busy machine measures the machine, not the server).
#[derive(Clone, Copy, Debug)]
pub struct CpuSnapshot {
    /// All CPUs, all states, in clock ticks (`/proc/stat`).
    total: u64,
    /// All CPUs, not idle and not waiting for I/O.
    busy: u64,
    /// This process, user + system (`/proc/self/stat`), same unit.
    own: u64,
    /// This process's threads named `loadgen*` (the load generator's tokio runtime), same unit.
    loadgen: u64,
    cpus: usize,
}

impl CpuSnapshot {
    /// `None` where `/proc` cannot be read.
    pub fn take() -> Option<CpuSnapshot> {
        let stat = procfs::KernelStats::current().ok()?;
        let t = &stat.total;
        let opt = |v: Option<u64>| v.unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let idle = t.idle + opt(t.iowait);
        let total = t.user + t.nice + t.system + idle + opt(t.irq) + opt(t.softirq) + opt(t.steal);
        let own = procfs::process::Process::myself().ok()?.stat().ok()?;
        Some(CpuSnapshot {
            total,
            busy: total.saturating_sub(idle),
            own: own.utime + own.stime,
            loadgen: thread_ticks(LOADGEN_THREAD_PREFIX),
            cpus: stat.cpu_time.len().max(1),
        })
    }

    /// CPU cores' worth of time used, on average since `earlier`, by this process and by every
    /// other process.
    pub fn since(&self, earlier: &CpuSnapshot) -> CpuShare {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        // The kernel counts the machine's ticks and this process's ticks apart, so over a short
        // span the process can seem to have used more than the whole machine did; it cannot have.
        let own = (self.own.saturating_sub(earlier.own) as f64).min(busy);
        let cores = self.cpus as f64;
        let loadgen = self.loadgen.saturating_sub(earlier.loadgen) as f64;
        CpuShare {
            own_cores: own / total * cores,
            other_cores: ((busy - own) / total * cores).max(0.0),
            loadgen_cores: (loadgen / total * cores).min(own / total * cores),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CpuShare {
    /// This whole process: server and load generator together when both run in it.
    pub own_cores: f64,
    /// Every other process on the machine.
    pub other_cores: f64,
    /// The part of `own_cores` spent on threads named `loadgen*`: the load generator's own
    /// tokio runtime (the server's threads have other names). 0 when it runs no such threads.
    pub loadgen_cores: f64,
}

impl CpuShare {
    /// `own_cores` minus the load generator's threads: the in-process server's share.
    pub fn server_cores(&self) -> f64 {
        (self.own_cores - self.loadgen_cores).max(0.0)
    }
}

/// The thread name (prefix) of the load generator's tokio runtimes, so that their CPU time can
/// be told apart from the in-process server's.
pub const LOADGEN_THREAD_PREFIX: &str = "loadgen";

/// User + system clock ticks of this process's live threads whose name starts with `prefix`
/// (`/proc/self/task/*/stat`); 0 where `/proc` cannot be read. Threads that have exited no
/// longer count, so take deltas over periods in which the threads of interest stay alive.
pub fn thread_ticks(prefix: &str) -> u64 {
    let Ok(tasks) = procfs::process::Process::myself().and_then(|p| p.tasks()) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| task.stat().ok())
        .filter(|stat| stat.comm.starts_with(prefix))
        .map(|stat| stat.utime + stat.stime)
        .sum()
}

/// The load generator's tokio runtime: `threads` workers named `loadgen*`, so that their
/// CPU time can be told apart from an in-process server's.
pub fn client_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(LOADGEN_THREAD_PREFIX)
        .enable_all()
        .build()
        .context("cannot start the client runtime")
}

/// The HTTP client for the server's `/metrics` and admin API: no proxy, 10 s per request.
pub fn metrics_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()?)
}

/// Raises this process's soft limit on open files towards `wanted` (at most the hard limit)
/// and returns the soft limit in force afterwards. A stream costs one socket on each side, so
/// an in-process server and its load generator need two descriptors per stream.
// `rlim_t` is u64 on Linux/glibc but not everywhere: keep the casts.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_limit(wanted: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let target = (wanted as libc::rlim_t).min(limit.rlim_max);
        if target > limit.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return target as u64;
            }
        }
        limit.rlim_cur as u64
    }
}

/// The checkout's commit for reports, `-dirty` when tracked files other than
/// `load-tests/results/` have uncommitted changes; "unknown" without git.
pub fn source_revision() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]).filter(|s| !s.is_empty()) else {
        return "unknown".into();
    };
    // Changed results (a suite writes several reports in turn) are not changed source.
    let changed = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)load-tests/results",
    ]);
    match changed {
        Some(c) if c.is_empty() => commit,
        Some(_) => format!("{commit}-dirty"),
        None => format!("{commit} (dirty state unknown)"),
    }
}

/// The threshold every benchmark gives [`wait_for_quiet`]: other processes use less than this
/// many cores before each measurement.
pub const QUIET_CORES: f64 = 0.15;

/// Waits, at most `max_wait`, until other processes use less than `threshold` CPU cores over
/// one second, printing what it waits for; returns what they used in the last second (`None`
/// where `/proc` cannot be read). Benchmarks call it before each measurement, so that a
/// compiler or test run elsewhere on the machine does not end up in the figures.
pub fn wait_for_quiet(threshold: f64, max_wait: std::time::Duration) -> Option<f64> {
    let start = std::time::Instant::now();
    let mut said: Option<std::time::Instant> = None;
    loop {
        let before = CpuSnapshot::take()?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        let others = CpuSnapshot::take()?.since(&before).other_cores;
        if others < threshold || start.elapsed() >= max_wait {
            if said.is_some() {
                eprintln!(
                    "[quiet] others now use {others:.2} cores after {:.0} s of waiting",
                    start.elapsed().as_secs_f64()
                );
            }
            return Some(others);
        }
        if said.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(15)) {
            eprintln!(
                "[quiet] other processes use {others:.2} CPU cores; waiting (at most {:.0} s) for a quiet machine",
                max_wait.as_secs_f64()
            );
            said = Some(std::time::Instant::now());
        }
    }
}

/// Busy and total clock ticks of CPU `cpu` from `/proc/stat` text (its `cpuN` line; busy is
/// everything but idle and I/O wait), `None` when the line is missing or malformed.
pub fn cpu_ticks(stat: &str, cpu: usize) -> Option<(u64, u64)> {
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    let total: u64 = values.iter().sum();
    Some((total.saturating_sub(idle), total))
}

/// User + system clock ticks of process `pid` (`/proc/<pid>/stat`), `None` where unreadable.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some(stat.utime + stat.stime)
}

/// A thread's id, name and nanoseconds on a CPU.
pub type ThreadCpu = (i32, String, u64);

/// Each live thread of process `pid` (`/proc/<pid>/task/*/schedstat`, finer than the clock
/// ticks of `stat`); empty where unreadable.
pub fn thread_cpu_ns(pid: u32) -> Vec<ThreadCpu> {
    let Ok(tasks) = procfs::process::Process::new(pid as i32).and_then(|p| p.tasks()) else {
        return Vec::new();
    };
    let read = |task: procfs::process::Task| {
        let ns = task.schedstat().ok()?.sum_exec_runtime;
        Some((task.tid, task.stat().ok()?.comm, ns))
    };
    tasks.flatten().filter_map(read).collect()
}

/// Seconds on a CPU between two [`thread_cpu_ns`] readings, of the threads whose name starts
/// with `prefix`; a thread started in between counts from 0, one gone counts no more.
pub fn threads_cpu_seconds(before: &[ThreadCpu], after: &[ThreadCpu], prefix: &str) -> f64 {
    let ns: u64 = after
        .iter()
        .filter(|(_, name, _)| name.starts_with(prefix))
        .map(|(tid, _, ns)| {
            let earlier = before.iter().find(|t| t.0 == *tid).map_or(0, |t| t.2);
            ns.saturating_sub(earlier)
        })
        .sum();
    ns as f64 / 1e9
}

/// Clock ticks per second, the unit of [`cpu_ticks`] and [`process_ticks`].
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second().max(1)
}

/// Today's date in UTC as `YYYY-MM-DD`, and the time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> (String, String) {
    utc_at(std::time::SystemTime::now())
}

fn utc_at(t: std::time::SystemTime) -> (String, String) {
    let time = humantime::format_rfc3339_seconds(t).to_string();
    (time[..10].to_string(), time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_driver_says_whether_a_virtual_cpu_halts_at_once() {
        assert_eq!(cpu_idle(None, None), "unknown");
        assert_eq!(cpu_idle(Some("intel_idle"), None), "intel_idle");
        assert_eq!(
            cpu_idle(Some("haltpoll"), Some("0")),
            "haltpoll, guest_halt_poll_ns 0 (an idle vCPU halts at once)"
        );
        assert_eq!(
            cpu_idle(Some("haltpoll"), Some("200000")),
            "haltpoll, guest_halt_poll_ns 200000"
        );
    }

    #[test]
    fn dates() {
        let day = |d: u64| {
            utc_at(std::time::UNIX_EPOCH + std::time::Duration::from_secs(d * 86_400 + 3_723)).0
        };
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(11_016), "2000-02-29");
        assert_eq!(day(20_417), "2025-11-25");
        assert_eq!(
            utc_at(std::time::UNIX_EPOCH + std::time::Duration::from_secs(3_723)).1,
            "1970-01-01T01:02:03Z"
        );
    }

    #[test]
    fn cpu_snapshots() {
        let Some(a) = CpuSnapshot::take() else { return };
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let share = CpuSnapshot::take().unwrap().since(&a);
        assert!(
            share.own_cores >= 0.0 && share.other_cores >= 0.0,
            "{share:?}"
        );
        assert!(share.own_cores <= a.cpus as f64 + 0.5, "{share:?}");
    }

    #[test]
    fn named_thread_ticks() {
        let handle = std::thread::Builder::new()
            .name("loadgen-test".into())
            .spawn(|| {
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < std::time::Duration::from_millis(200) {
                    x = x.wrapping_mul(31).wrapping_add(1);
                }
                std::hint::black_box(x);
                thread_ticks("loadgen-test")
            })
            .unwrap();
        let ticks = handle.join().unwrap();
        if std::path::Path::new("/proc/self/task").exists() {
            assert!(ticks > 0, "a busy named thread used no CPU ticks");
        }
        assert_eq!(thread_ticks("no-such-thread-name"), 0);
        assert!(raise_nofile_limit(256) >= 256);
    }

    #[test]
    fn thread_cpu_by_name() {
        let before = [
            (1, "worker-mlp-1-0".to_string(), 1_000),
            (2, "actix-rt".into(), 5),
        ];
        let after = [
            (1, "worker-mlp-1-0".to_string(), 501_000),
            (2, "actix-rt".into(), 9),
            (3, "worker-mlp-1-1".into(), 250_000),
        ];
        assert_eq!(threads_cpu_seconds(&before, &after, "worker-mlp-"), 750e-6);
        assert_eq!(threads_cpu_seconds(&before, &after, "nothing"), 0.0);
        let mine = thread_cpu_ns(std::process::id());
        assert!(mine.iter().any(|(_, _, ns)| *ns > 0), "{mine:?}");
    }

    #[test]
    fn per_cpu_ticks() {
        let stat = "cpu  10 0 10 100 5 0 0 0 0 0\ncpu0 4 1 3 50 2 0 1 0 0 0\ncpu1 6 0 7 50 3 0 0 1\nintr 5\n";
        assert_eq!(cpu_ticks(stat, 0), Some((9, 61)));
        assert_eq!(cpu_ticks(stat, 1), Some((14, 67)));
        assert_eq!(cpu_ticks(stat, 2), None);
        assert_eq!(cpu_ticks("cpu0 x y\n", 0), None);
        if let Ok(text) = std::fs::read_to_string("/proc/stat") {
            let (busy, total) = cpu_ticks(&text, 0).expect("cpu0 is in /proc/stat");
            assert!(busy <= total && total > 0);
            assert!(process_ticks(std::process::id()).is_some());
        }
    }

    #[test]
    fn machine_fields() {
        let m = MachineInfo::collect();
        assert!(m.nproc >= 1);
        if std::path::Path::new("/proc/cpuinfo").exists() {
            assert_ne!(m.cpu_model, "unknown", "{m:?}");
            assert!(m.mem_total.ends_with(" kB"), "{m:?}");
            assert_eq!(m.loadavg_at_start.split_whitespace().count(), 5, "{m:?}");
        }
    }
}
