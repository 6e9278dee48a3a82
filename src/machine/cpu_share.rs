//! How much of the CPU it may use the process used over a span: the door's sign that the CPU,
//! not a model's queue, is what is short.
//!
//! The time a request waits in the kernel's socket buffers while the HTTP threads are busy is
//! invisible to the server, so the latency it measures stays low while its clients' grows
//! (docs/overload.md). A process that used all the cores it may run on is the sign that does
//! not depend on that time. It is the process's own use (user + system time of all its
//! threads, from the kernel's clock for it), so that another process on the machine (a build,
//! a neighbour) does not make the server turn its own clients away.

use std::time::{Duration, Instant};

/// The process's CPU time since it started: every thread's user and system time.
pub fn process_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through a pointer to a live one; the
    // process CPU clock exists on every Linux and macOS this builds for.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    if status != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        now.tv_sec.max(0) as u64,
        now.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The cores the process may use: its CPU affinity and its cgroup's quota, as the standard
/// library reads them (a quota of 1.5 cores counts as 1, so such a process can read as
/// busy with half a core to spare).
pub fn usable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The share of its usable cores the process used since the last reading.
#[derive(Clone, Copy, Debug)]
pub struct CpuShare {
    cores: f64,
    cpu: Duration,
    at: Instant,
}

impl CpuShare {
    pub fn new() -> CpuShare {
        CpuShare {
            cores: usable_cores() as f64,
            cpu: process_cpu_time(),
            at: Instant::now(),
        }
    }

    /// The share (0 to about 1) of the usable cores used since the last call or since
    /// [`new`](Self::new), and a new span from now.
    pub fn take(&mut self) -> f64 {
        let (cpu, at) = (process_cpu_time(), Instant::now());
        let wall = at.duration_since(self.at).as_secs_f64() * self.cores;
        let used = cpu.saturating_sub(self.cpu).as_secs_f64();
        (self.cpu, self.at) = (cpu, at);
        if wall > 0.0 {
            used / wall
        } else {
            0.0
        }
    }
}

impl Default for CpuShare {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_done_shows_as_a_share_of_the_usable_cores() {
        let mut share = CpuShare::new();
        let start = process_cpu_time();
        let mut x = 0u64;
        while process_cpu_time().saturating_sub(start) < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = share.take();
        // Other tests' threads run in this process too (and a cgroup's quota may be a
        // fraction of a core more than the whole cores counted), so only this holds.
        assert!(used > 0.0 && used.is_finite(), "{used}");
    }
}
