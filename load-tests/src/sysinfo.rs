//! What the benchmark report says about the machine it ran on, read from `/proc` (Linux);
//! anything unreadable is reported as "unknown" rather than failing the run.

use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, serde::Serialize)]
pub struct MachineInfo {
    /// Logical CPUs this process may use.
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total: String,
    pub kernel: String,
    /// `/proc/loadavg` when the run started: a busy machine makes every figure lower.
    pub loadavg_at_start: String,
}

impl MachineInfo {
    pub fn collect() -> MachineInfo {
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = field(&cpuinfo, "model name")
            .or_else(|| field(&cpuinfo, "Model"))
            .or_else(|| field(&cpuinfo, "cpu model"))
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total = field(&meminfo, "MemTotal").unwrap_or_else(|| "unknown".into());
        let kernel = read_trimmed("/proc/sys/kernel/osrelease");
        let loadavg_at_start = read_trimmed("/proc/loadavg");
        MachineInfo {
            nproc,
            cpu_model,
            mem_total,
            kernel,
            loadavg_at_start,
        }
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The value of the first `key : value` line of a `/proc` file.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
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
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let total: u64 = cpu.iter().take(8).sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count();
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = own_stat.rsplit_once(')')?.1.split_whitespace().collect();
        let utime: u64 = rest.get(11)?.parse().ok()?;
        let stime: u64 = rest.get(12)?.parse().ok()?;
        Some(CpuSnapshot {
            total,
            busy: total.saturating_sub(idle),
            own: utime + stime,
            loadgen: thread_ticks(LOADGEN_THREAD_PREFIX),
            cpus: cpus.max(1),
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
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut ticks = 0;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("", |(_, n)| n);
        if !name.starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        ticks += utime + stime;
    }
    ticks
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

/// Today's date in UTC as `YYYY-MM-DD`, and the time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let date = format!("{y:04}-{m:02}-{d:02}");
    let time = format!(
        "{date}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    (date, time)
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) — H. Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Writes a benchmark run into `dir`: `report.md`, `results.json`, and the plot that
/// `draw` makes from those results as `plot_file`. A plot that fails is said on stderr
/// (prefixed `[tag]`), not an error: the numbers are already written.
pub fn save_run(
    dir: &std::path::Path,
    tag: &str,
    report: &str,
    results: &serde_json::Value,
    plot_file: &str,
    draw: fn(&serde_json::Value, &std::path::Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), report)
        .with_context(|| format!("cannot write {}/report.md", dir.display()))?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(results)?,
    )
    .with_context(|| format!("cannot write {}/results.json", dir.display()))?;
    if let Err(e) = draw(results, &dir.join(plot_file)) {
        eprintln!("[{tag}] {e:#}");
    }
    Ok(())
}

/// The software lines of a report's machine section: the ONNX Runtime version and the
/// checkout's revision, then a blank line.
pub fn write_software_lines(md: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        md,
        "- ONNX Runtime: {} (CPU execution provider)",
        streamserve::runtime::ORT_VERSION
    );
    let _ = writeln!(
        md,
        "- streamserve source: `{}` (`-dirty`: uncommitted source changes, results aside)\n",
        source_revision()
    );
}

/// The opening every report shares: title, when, the command, and the machine (up to its load
/// average; each report adds its own machine lines after it).
pub fn write_report_header(
    md: &mut String,
    title: &str,
    started_at: &str,
    elapsed: std::time::Duration,
    command: &str,
    machine: &MachineInfo,
) {
    use std::fmt::Write as _;
    let _ = writeln!(md, "# {title}\n");
    let _ = writeln!(
        md,
        "Started {started_at} · took {:.0} s in all.\n",
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "Command (from the repository root):\n\n```\n{command}\n```\n"
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "- nproc: {}", machine.nproc);
    let _ = writeln!(md, "- CPU: {}", machine.cpu_model);
    let _ = writeln!(md, "- memory: {}", machine.mem_total);
    let _ = writeln!(md, "- kernel: {}", machine.kernel);
    let _ = writeln!(md, "- load average at start: {}", machine.loadavg_at_start);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
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
    fn proc_fields() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: a b\n";
        assert_eq!(field(text, "model name").as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(field(text, "nothing"), None);
    }
}
