//! The machine's budgets that every model's replicas share: CPU threads ([`CpuBudget`]) and
//! memory per device ([`MemoryBudget`]). The supervisor takes from them when it loads a version,
//! routers when they scale up, and both give back when replicas go. Plain atomics: taking never
//! blocks anyone.

use crate::manifest::Device;

/// Memory per device, in MiB: RAM for CPU replicas, VRAM for each GPU's. A version whose
/// replicas would not fit is refused when it loads, and autoscaling adds a replica only where it
/// fits, so models are packed onto devices by what they need. A replica is estimated at twice its
/// model file (weights plus ONNX Runtime's working memory).
#[derive(Debug)]
pub struct MemoryBudget {
    ram: std::sync::atomic::AtomicI64,
    pub ram_total_mb: i64,
    vram: Vec<std::sync::atomic::AtomicI64>,
    /// Per GPU; 0: VRAM is not budgeted.
    pub vram_total_mb: i64,
}

impl MemoryBudget {
    pub fn new(ram_mb: u64, vram_mb_per_gpu: u64) -> MemoryBudget {
        MemoryBudget {
            ram: std::sync::atomic::AtomicI64::new(ram_mb as i64),
            ram_total_mb: ram_mb as i64,
            vram: (0..16)
                .map(|_| std::sync::atomic::AtomicI64::new(vram_mb_per_gpu as i64))
                .collect(),
            vram_total_mb: vram_mb_per_gpu as i64,
        }
    }

    fn pool(&self, device: Device) -> Option<(&std::sync::atomic::AtomicI64, i64)> {
        match device {
            Device::Cpu => Some((&self.ram, self.ram_total_mb)),
            Device::Cuda(n) if self.vram_total_mb > 0 => {
                self.vram.get(n as usize).map(|a| (a, self.vram_total_mb))
            }
            Device::Cuda(_) => None,
        }
    }

    /// Takes `mb` on `device` if it fits; the error says how much is left.
    pub fn try_take(&self, device: Device, mb: u64) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let Some((pool, total)) = self.pool(device) else {
            return Ok(());
        };
        let want = mb as i64;
        pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            (left >= want).then_some(left - want)
        })
        .map(|_| ())
        .map_err(|left| {
            format!("needs about {mb} MiB on {device}, {left} MiB of its {total} MiB budget left")
        })
    }

    pub fn give_back(&self, device: Device, mb: u64) {
        if let Some((pool, _)) = self.pool(device) {
            pool.fetch_add(mb as i64, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Estimated memory of one replica of a model file, in MiB.
pub fn replica_memory_mb(model_file_bytes: u64) -> u64 {
    (model_file_bytes * 2).div_ceil(1 << 20)
}

/// What the machine has now, in MiB (`MemAvailable`), for a default RAM budget.
pub fn available_ram_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX >> 24, |kb| kb / 1024)
}

/// A budget of CPU threads (ONNX Runtime intra-op threads across all replicas). Routers take
/// from it to add replicas under load and give back when they scale down or unload, so models
/// share the machine by what they need. A plain atomic: taking never blocks anyone.
#[derive(Debug)]
pub struct CpuBudget {
    available: std::sync::atomic::AtomicI64,
    pub total: i64,
}

impl CpuBudget {
    pub fn new(total: usize) -> CpuBudget {
        CpuBudget {
            available: std::sync::atomic::AtomicI64::new(total as i64),
            total: total as i64,
        }
    }

    /// Takes `threads` if that many are left.
    pub fn try_take(&self, threads: usize) -> bool {
        use std::sync::atomic::Ordering;
        let threads = threads as i64;
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= threads).then_some(left - threads)
            })
            .is_ok()
    }

    /// Takes `threads` even beyond the budget (a version's initial replicas); returns whether
    /// it fitted.
    pub fn take(&self, threads: usize) -> bool {
        self.available
            .fetch_sub(threads as i64, std::sync::atomic::Ordering::AcqRel)
            >= threads as i64
    }

    pub fn give_back(&self, threads: usize) {
        self.available
            .fetch_add(threads as i64, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn available(&self) -> i64 {
        self.available.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Both budgets, shared by the supervisor and every router.
#[derive(Debug)]
pub struct Budgets {
    pub cpu: CpuBudget,
    pub memory: MemoryBudget,
}

impl Budgets {
    pub fn new(cpu_threads: usize, ram_mb: u64, vram_mb_per_gpu: u64) -> Budgets {
        Budgets {
            cpu: CpuBudget::new(cpu_threads),
            memory: MemoryBudget::new(ram_mb, vram_mb_per_gpu),
        }
    }
}

impl Default for Budgets {
    /// Every CPU and the memory available now; VRAM not budgeted.
    fn default() -> Self {
        Budgets::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
            available_ram_mb(),
            0,
        )
    }
}
