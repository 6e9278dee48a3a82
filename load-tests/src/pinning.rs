//! Pinning a benchmark to two CPUs: the server on one, the load generator on the other, so
//! that the server's CPU, not a CPU shared with its load, is what runs out. The server child
//! gets its CPU between fork and exec ([`set_affinity`], through
//! [`crate::fleet::procs::InstanceSetup::cpu`]); this process's threads move with
//! [`Pinning::pin_this_process`] and move back when its guard drops.

use anyhow::{bail, Context as _};

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
            eprintln!("[loadgen] cannot restore this process's CPU affinity: {e:#}");
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
pub fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
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
pub fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
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
}
